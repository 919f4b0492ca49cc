"""Optimisers (SGD, Adam, AdamW) with PyTorch's update rules over one flat parameter buffer (their learning-rate
schedules: :mod:`xpcnn.training.schedules`).

An optimiser keeps all of a model's parameters in one flat 1-D buffer (in
``model.named_parameters()`` order) and its state in flat buffers of the same
length, so that one step costs a handful of array operations (GPU kernel
launches) whatever the number of parameters.  Each step gathers
``model.named_gradients()`` with one concatenation.  As in PyTorch, backward
passes add to the gradients and ``zero_grad()`` clears them: call it before
each step's backward.

Where slices and reshapes are writeable views (NumPy, CuPy, torch) the model's
parameters are installed as views of the flat buffer (``model.set_parameters``)
and the update runs in place.  Elsewhere (JAX, array-api-strict) it is
functional: new flat buffers, then fresh per-parameter slices are installed.
A parameter replaced behind the optimiser's back (``load_state_dict``,
``Layer.to``, ``set_parameters``) is noticed at the next step, by identity, and
the flat buffer is gathered again.  ``lr`` is a plain attribute that
learning-rate schedules set before each step.

With ``ema`` (a decay d in (0, 1), as Keras' ``use_ema``/``ema_momentum``) every
step also updates an exponential moving average of the weights, one more slot:
``a = d * a + (1 - d) * p`` from zeros, read debiased as ``a / (1 - d**steps)``
(as Adam's moments), so that step t weighs the parameters after step i by
``(1 - d) * d**(t - i) / (1 - d**t)``.  :meth:`Optimizer.averaged_parameters`
gives the average; the trainer evaluates and keeps it (docs/library.md).
"""

from __future__ import annotations

import math

import numpy as np
from array_api_compat import device, is_cupy_array, is_numpy_array, is_torch_array

from . import functional as F
from .backends.backend import backend_of, beyond_range, namespace, to_host
from .ops.fastpath import optimizer_kernels

MIN_LR = float(np.finfo(np.float32).tiny)  # a floor: under float32's least normal number a rate's steps vanish


def updates_in_place(array) -> bool:
    """Whether ``array``'s library makes basic slices and reshapes writeable views of the same memory.

    Then the model's parameters can be views of the optimiser's flat buffer that in-place updates move.
    JAX arrays are immutable; array-api-strict promises no views.
    """
    return is_numpy_array(array) or is_cupy_array(array) or is_torch_array(array)


def _subtract(param, change):
    """``param - change``: written into ``param`` where the backend updates in place (the model views it)."""
    if updates_in_place(param):
        param -= change
        return param
    return param - change


def _scale(param, factor):
    """``param * factor``: written into ``param`` where the backend updates in place."""
    if updates_in_place(param):
        param *= factor
        return param
    return param * factor


AVERAGE = "ema"  # the slot of the weights' moving average


class Optimizer:
    """Base class: the flat buffers, the step, the per-parameter state view and (de)serialisation.

    Subclasses give ``slots`` (the names of their state buffers) and their one update rule over
    flat (P,) arrays, P the total number of parameter elements (:meth:`update`: ``_rule``, and
    ``_fused`` for a backend's fused kernel of the same rule).  ``ema`` (0 for none) keeps a moving
    average of the weights with that decay in one more slot (the module docstring).
    """

    slots: tuple[str, ...] = ()

    def __init__(self, model, lr: float, ema: float = 0.0):
        if not MIN_LR <= lr < math.inf:
            raise ValueError(f"{type(self).__name__}: lr must be a number >= {MIN_LR:.3g}, got {lr}")
        if not 0 <= ema < 1:
            raise ValueError(f"{type(self).__name__}: ema must be a decay in [0, 1), got {ema}")
        self.model = model
        self.lr = float(lr)
        self.ema = float(ema)
        self.steps = 0
        # The layout of the flat buffers, set by _gather: parameter names, shapes and [start, stop) offsets.
        self._names: tuple[str, ...] = ()
        self._shapes: tuple[tuple[int, ...], ...] = ()
        self._bounds: tuple[tuple[int, int], ...] = ()
        self._flat = None  # (P,) all parameters, None until the first step or load_state_dict
        self._installed: tuple = ()  # the arrays last given to the model, in _names order
        self._state: dict = {}  # slot name -> (P,) buffer, created at the first step

    # --- the step ---

    def zero_grad(self) -> None:
        """Clear the model's gradients (to none: the next backward assigns them, costing no array operation)."""
        self.model.zero_grad()

    def step(self) -> None:
        """Apply one update from the gradients summed since the last :meth:`zero_grad`."""
        params, grads = dict(self.model.named_parameters()), dict(self.model.named_gradients())
        missing = sorted(set(params) - set(grads))
        if missing:
            raise RuntimeError(  # PyTorch skips such parameters (frozen ones); one flat update cannot
                f"{type(self).__name__}.step(): no gradients for {missing}; call backward() first (every parameter "
                "is updated: none can be left out)"
            )
        flat, slots = self.flat_state()
        if flat is not None:
            flat, slots = self.update(flat, self.gradient_pieces(grads), slots, self.lr, self.steps + 1)
        self.advance(flat, slots)

    def gradient_pieces(self, grads: dict) -> list:
        """The gradients ``{name: array}`` as 1-d arrays in the flat buffer's order (views: no operation)."""
        for name, shape in zip(self._names, self._shapes, strict=True):
            if tuple(grads[name].shape) != shape:
                raise ValueError(
                    f"{type(self).__name__}.step(): gradient for {name} has shape {tuple(grads[name].shape)}, "
                    f"expected {shape}"
                )
        xp = namespace(*grads.values())
        return [xp.reshape(grads[name], (-1,)) for name in self._names]

    def update(self, param, pieces: list, slots: dict, lr, steps) -> tuple:
        """The update rule: (new (P,) parameters, new ``{slot: (P,)}``) from (P,) ``param``, the gradient and ``slots``.

        ``pieces`` are the gradient as 1-d arrays in the flat buffer's order (:meth:`gradient_pieces`): the
        rule concatenates them with whatever else its one concatenation should hold.  ``slots`` holds every
        live slot (:meth:`flat_state`).  ``lr`` and ``steps`` (the count including this step) are arguments,
        not read from ``self``, so that a compiled step can pass them as traced values: a Python number would
        be baked into the trace.  Pure, except where a backend has a fused kernel for the rule (CuPy,
        :func:`xpcnn.ops.fastpath.optimizer_kernels`): that one writes into ``param`` and ``slots``' buffers and
        returns them.
        """
        fused = optimizer_kernels(param)
        if fused is not None:
            param, slots = self._fused(fused, param, namespace(param).concat(pieces), dict(slots), lr, steps)
        else:
            param, slots = self._rule(param, pieces, dict(slots), lr, steps)
        if self.ema:
            slots[AVERAGE] = self.ema * slots[AVERAGE] + (1.0 - self.ema) * param
        return param, slots

    def _rule(self, param, pieces: list, slots: dict, lr, steps) -> tuple:
        """The Array API update (see :meth:`update`); ``slots`` is the caller's copy, free to assign to."""
        raise NotImplementedError

    def _fused(self, kernels, param, grad, slots: dict, lr, steps) -> tuple:
        """The same update as :meth:`_rule` by the backend's fused kernel, in place."""
        raise NotImplementedError

    # --- the flat buffers ---

    def _sync(self, params: dict) -> None:
        """Gather the flat buffer again unless the model still holds exactly the arrays last installed."""
        if tuple(params) != self._names or any(
            p is not installed for p, installed in zip(params.values(), self._installed, strict=True)
        ):
            self._gather(params)

    def _gather(self, params: dict) -> None:
        """Concatenate the model's current parameters into a new flat buffer and install views (or slices) of it.

        The state buffers are kept (moved to the parameters' backend and dtype if those changed), which
        needs the same parameter names and shapes as before.
        """
        names = tuple(params)
        shapes = tuple(tuple(int(s) for s in p.shape) for p in params.values())
        if self._state and (names, shapes) != (self._names, self._shapes):
            was, now = dict(zip(self._names, self._shapes, strict=True)), dict(zip(names, shapes, strict=True))
            raise ValueError(
                f"{type(self).__name__}: the model's parameters changed since the optimiser state was made "
                f"(was {was}, now {now}); build a new optimiser"
            )
        values = list(params.values())
        if any(p.dtype != values[0].dtype for p in values):
            dtypes = {name: str(p.dtype) for name, p in params.items()}
            raise ValueError(f"{type(self).__name__}: parameters must share one dtype, got {dtypes}")
        stops = np.cumsum([math.prod(shape) for shape in shapes], dtype=np.int64).tolist()
        self._names, self._shapes = names, shapes
        self._bounds = tuple(zip([0, *stops[:-1]], stops, strict=True))
        if not names:
            self._flat, self._installed = None, ()
            return
        xp = namespace(*values)
        self._flat = xp.concat([xp.reshape(p, (-1,)) for p in values])
        self._state = {slot: _follow(buffer, self._flat) for slot, buffer in self._state.items()}
        self._install()

    def _install(self) -> None:
        """Give the model its parameters as views (in-place backends) or slices of the flat buffer."""
        views = self.split(self._flat)
        self.model.set_parameters(views)
        self._installed = tuple(views.values())

    def split(self, flat) -> dict:
        """``{name: parameter}`` cut from a (P,) buffer in this optimiser's layout: views where the backend has them."""
        xp = namespace(flat)
        return {
            name: xp.reshape(flat[start:stop], shape)
            for name, shape, (start, stop) in zip(self._names, self._shapes, self._bounds, strict=True)
        }

    # --- the state a training step reads and writes ---

    def live_slots(self) -> tuple[str, ...]:
        """The state buffers :meth:`update` keeps with this optimiser's settings: the rule's, then the average's."""
        return self._rule_slots() + ((AVERAGE,) if self.ema else ())

    def _rule_slots(self) -> tuple[str, ...]:
        """The slots the update rule keeps with this optimiser's settings."""
        return self.slots

    def averaged_parameters(self) -> dict:
        """``{name: parameter}``: the debiased moving average of the weights after the steps so far (``ema``),
        on the parameters' backend; the parameters themselves without ``ema`` or before the first step."""
        flat, slots = self.flat_state()
        if not self.ema or flat is None or self.steps == 0:
            return dict(self.model.named_parameters())
        return self.split(slots[AVERAGE] / (1.0 - self.ema**self.steps))

    def flat_state(self) -> tuple:
        """(flat parameters (P,), state ``{slot: (P,)}``): what :meth:`update` reads.

        Gathers the model's current parameters first.  Every live slot is there: a slot not made yet
        is zeros, from which the first update is the same as from none (momentum 0 * v + g is g).
        (None, {}) for a model without parameters.
        """
        self._sync(dict(self.model.named_parameters()))
        if self._flat is None:
            return None, {}
        xp = namespace(self._flat)
        slots = {slot: self._state.get(slot) for slot in self.live_slots()}
        return self._flat, {slot: xp.zeros_like(self._flat) if b is None else b for slot, b in slots.items()}

    def advance(self, flat, slots: dict, parameters: dict | None = None, steps: int = 1) -> None:
        """Take the result of ``steps`` steps (one, or an epoch program's): the new buffers, and the model's
        parameters cut from ``flat``.

        ``parameters`` is ``split(flat)`` where the step made it already (a compiled step does: slicing
        outside it would cost a dispatch per parameter).
        """
        self.steps += steps
        if flat is None:
            return
        replaced, self._flat, self._state = flat is not self._flat, flat, dict(slots)
        if parameters is not None:
            self.model.set_parameters(parameters)
            self._installed = tuple(parameters[name] for name in self._names)
        elif replaced:  # else the update wrote into the buffer the model's parameters view
            self._install()

    # --- per-parameter state and (de)serialisation ---

    def _per_parameter(self, buffers: dict, reshape) -> dict[str, dict]:
        """``{name: {slot: reshape(buffer[start:stop], shape)}}`` for (P,) ``buffers``, the per-parameter format.

        Empty before the first step; after it every parameter has an entry, empty for an optimiser without slots.
        """
        if self.steps == 0 and not buffers:
            return {}
        return {
            name: {slot: reshape(buffer[start:stop], shape) for slot, buffer in buffers.items()}
            for name, shape, (start, stop) in zip(self._names, self._shapes, self._bounds, strict=True)
        }

    @property
    def state(self) -> dict[str, dict]:
        """Per-parameter state ``{name: {slot: array in the parameter's shape}}``: views where the backend has them."""
        return self._per_parameter(self._state, lambda a, shape: namespace(a).reshape(a, shape))

    def state_dict(self) -> dict:
        """Step count, learning rate and per-parameter state as host NumPy arrays in the parameters' shapes."""
        hosts = {slot: to_host(buffer) for slot, buffer in self._state.items()}  # one transfer per slot
        return {"steps": self.steps, "lr": self.lr, "state": self._per_parameter(hosts, np.reshape)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`, moving arrays to the backend and dtype of the model's parameters.

        Every slot must be given for every parameter, in its shape; with ``ema``, after a step, the average too.
        """
        if not isinstance(state_dict, dict) or not {"state", "steps"} <= set(state_dict):
            raise ValueError("not an xpcnn optimiser's state_dict: no 'state' and 'steps' (PyTorch's are not read)")
        params = dict(self.model.named_parameters())
        state = state_dict["state"]
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"optimiser state does not fit this model: unexpected {unknown}")
        slots = list(dict.fromkeys(slot for entry in state.values() for slot in entry))
        known = self.slots + ((AVERAGE,) if self.ema else ())
        foreign = [slot for slot in slots if slot not in known]
        if foreign:
            kept = " (it was made with ema, a moving average of the weights)" if AVERAGE in foreign else ""
            raise ValueError(f"optimiser state does not fit {type(self).__name__}: unexpected slots {foreign}{kept}")
        if self.ema and int(state_dict["steps"]) > 0 and AVERAGE not in slots:
            raise ValueError("optimiser state holds no moving average of the weights (it was made without ema)")
        host: dict[str, list[np.ndarray]] = {}
        for slot in slots:
            lacking = [name for name in params if slot not in state.get(name, {})]
            if lacking:
                raise ValueError(f"optimiser state does not fit this model: no {slot!r} for {lacking}")
            host[slot] = [np.asarray(state[name][slot]) for name in params]
            for name, value in zip(params, host[slot], strict=True):
                if value.shape != tuple(params[name].shape):
                    raise ValueError(
                        f"optimiser state does not fit this model: {slot!r} of {name} has shape {value.shape}, "
                        f"expected {tuple(params[name].shape)}"
                    )
                if beyond_range(value, params[name].dtype):
                    raise ValueError(f"optimiser state: {slot!r} of {name} holds values too large for its dtype")
        self._state = {}
        self._sync(params)
        if self._names:
            backend = backend_of(self._flat)
            self._state = {
                slot: backend.asarray(np.concatenate([v.reshape(-1) for v in values]), self._flat.dtype)
                for slot, values in host.items()
            }
        self.steps = int(state_dict["steps"])
        self.lr = float(state_dict["lr"])


def _follow(buffer, like):
    """``buffer`` on the backend, device and dtype of ``like`` (a copy through the host only where they differ)."""
    if type(buffer) is type(like) and buffer.dtype == like.dtype and device(buffer) == device(like):
        return buffer
    return backend_of(like).asarray(to_host(buffer), like.dtype)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

    g = grad + weight_decay * p;  v = momentum * v + g;
    p -= lr * (g + momentum * v if nesterov else v)     (v = g at the first step)

    The update is linear in (p, grad, v): the step direction and the new velocity are one
    product of a constant matrix (:meth:`coefficients`) with the three stacked, so a step is a
    concatenation, a product and ``p -= lr * direction`` whatever the settings.
    """

    slots = ("momentum",)

    def __init__(
        self,
        model,
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        ema: float = 0.0,
    ):
        super().__init__(model, lr, ema)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        if not 0 <= weight_decay < math.inf:
            raise ValueError(f"SGD: weight_decay must be a number >= 0, got {weight_decay}")
        self.momentum, self.nesterov, self.weight_decay = float(momentum), nesterov, float(weight_decay)

    def _rule_slots(self):
        return self.slots if self.momentum else ()

    def coefficients(self) -> tuple:
        """Rows (direction[, new velocity]) of coefficients over the operands (p, grad[, v]).

        v' = m v + grad + wd p;  direction = v', or with Nesterov
        grad + wd p + m v' = (1 + m)(grad + wd p) + m^2 v.  Without momentum there is no v.
        """
        m, wd = self.momentum, self.weight_decay
        if not m:
            return ((wd, 1.0),)
        velocity = (wd, 1.0, m)
        return ((wd * (1 + m), 1 + m, m * m) if self.nesterov else velocity, velocity)

    def _operands(self, param, grads: list, state: dict) -> list:
        """The 1-d operands (p, grad pieces...[, v]) of the update (v: zeros before the first step, see
        :meth:`flat_state`)."""
        if not self.momentum:
            return [param, *grads]
        return [param, *grads, state["momentum"]]

    def _directions(self, operands):
        """(direction, new velocity or None) from the (2 or 3, P) operands (p, grad[, v]): one product."""
        rows = F.constant(operands, self.coefficients()) @ operands
        return rows[0, :], (rows[1, :] if self.momentum else None)

    def _rule(self, param, pieces, slots, lr, steps):
        xp = namespace(param)
        operands = xp.concat(self._operands(param, pieces, slots))
        direction, velocity = self._directions(xp.reshape(operands, (-1, param.shape[0])))
        if self.momentum:
            slots["momentum"] = velocity  # a row of the product: taken, not copied
        return _subtract(param, lr * direction), slots

    def _fused(self, kernels, param, grad, slots, lr, steps):
        velocity = slots.get("momentum")
        kernels.sgd_update_in_place(param, grad, velocity, lr, self.momentum, self.nesterov, self.weight_decay, False)
        return param, slots


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` adds an L2 term to the gradient."""

    decoupled = False
    slots = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        model,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ema: float = 0.0,
    ):
        super().__init__(model, lr, ema)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{type(self).__name__}: betas must be two numbers in [0, 1), got {betas}")
        if not 0 <= weight_decay < math.inf:
            raise ValueError(f"{type(self).__name__}: weight_decay must be a number >= 0, got {weight_decay}")
        if not 0 < eps < math.inf:
            raise ValueError(f"{type(self).__name__}: eps must be a number > 0, got {eps}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def _rule(self, param, pieces, slots, lr, steps):
        beta1, beta2 = self.betas
        grad = namespace(param).concat(pieces)
        if self.weight_decay:
            if self.decoupled:
                param = _scale(param, 1.0 - lr * self.weight_decay)
            else:
                grad = grad + self.weight_decay * param
        m = beta1 * slots["exp_avg"] + (1.0 - beta1) * grad
        v = beta2 * slots["exp_avg_sq"] + (1.0 - beta2) * grad * grad
        slots["exp_avg"], slots["exp_avg_sq"] = m, v
        step_size = lr / (1.0 - beta1**steps)
        denom_scale = 1.0 / (1.0 - beta2**steps) ** 0.5  # not math.sqrt: steps may be a traced array
        xp = namespace(v)
        return _subtract(param, step_size * m / (xp.sqrt(v) * denom_scale + self.eps)), slots

    def _fused(self, kernels, param, grad, slots, lr, steps):
        kernels.adam_update_in_place(
            param,
            grad,
            slots["exp_avg"],
            slots["exp_avg_sq"],
            lr,
            self.betas,
            self.eps,
            self.weight_decay,
            self.decoupled,
            steps,
        )
        return param, slots


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay before the Adam step."""

    decoupled = True

    def __init__(
        self,
        model,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        ema: float = 0.0,
    ):
        super().__init__(model, lr, betas, eps, weight_decay, ema)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
