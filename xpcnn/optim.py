"""Optimisers over a model's parameters, with PyTorch's update rules.

An optimiser reads ``model.parameters()`` and ``model.gradients()`` and writes
the new values back with ``model.set_parameters``; updates are functional
(new arrays), so they run on immutable-array backends too.  ``lr`` is a plain
attribute that learning-rate schedules set before each step.
"""

from __future__ import annotations

import math

import numpy as np
from array_api_compat import array_namespace

from .backend import backend_of, to_host


class Optimizer:
    """Base class: the step loop, per-parameter state and (de)serialisation."""

    def __init__(self, model, lr: float):
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {lr}")
        self.model = model
        self.lr = float(lr)
        self.steps = 0
        self.state: dict[str, dict] = {}

    def step(self) -> None:
        """Apply one update from the gradients of the last backward pass."""
        params, grads = self.model.parameters(), self.model.gradients()
        missing = sorted(set(params) - set(grads))
        if missing:
            raise RuntimeError(f"{type(self).__name__}.step(): no gradients for {missing}; call backward() first")
        self.steps += 1
        self.model.set_parameters(
            {name: self.update(p, grads[name], self.state.setdefault(name, {})) for name, p in params.items()}
        )

    def update(self, param, grad, state: dict):
        """New value of one parameter; may store arrays in ``state``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Step count, learning rate and per-parameter state as host NumPy arrays."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "state": {name: {k: to_host(v) for k, v in slots.items()} for name, slots in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`, moving arrays to the backend and dtype of the model's parameters."""
        params = self.model.parameters()
        unknown = sorted(set(state_dict["state"]) - set(params))
        if unknown:
            raise ValueError(f"optimiser state does not fit this model: unexpected {unknown}")
        self.steps = int(state_dict["steps"])
        self.lr = float(state_dict["lr"])
        self.state = {
            name: {k: backend_of(params[name]).asarray(np.asarray(v), params[name].dtype) for k, v in slots.items()}
            for name, slots in state_dict["state"].items()
        }


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

    g = grad + weight_decay * p;  v = momentum * v + g;
    p -= lr * (g + momentum * v if nesterov else v)     (v = g at the first step)
    """

    def __init__(
        self, model, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
    ):
        super().__init__(model, lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        if weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay}")
        self.momentum, self.nesterov, self.weight_decay = float(momentum), nesterov, float(weight_decay)

    def update(self, param, grad, state):
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            velocity = state.get("momentum")
            velocity = grad if velocity is None else self.momentum * velocity + grad
            state["momentum"] = velocity
            grad = grad + self.momentum * velocity if self.nesterov else velocity
        return param - self.lr * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` adds an L2 term to the gradient."""

    decoupled = False

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(model, lr)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def update(self, param, grad, state):
        beta1, beta2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                param = param * (1.0 - self.lr * self.weight_decay)
            else:
                grad = grad + self.weight_decay * param
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        m = (1.0 - beta1) * grad if m is None else beta1 * m + (1.0 - beta1) * grad
        v = (1.0 - beta2) * grad * grad if v is None else beta2 * v + (1.0 - beta2) * grad * grad
        state["exp_avg"], state["exp_avg_sq"] = m, v
        step_size = self.lr / (1.0 - beta1**self.steps)
        denom_scale = 1.0 / math.sqrt(1.0 - beta2**self.steps)
        xp = array_namespace(v)
        return param - step_size * m / (xp.sqrt(v) * denom_scale + self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay before the Adam step."""

    decoupled = True

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(model, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


SCHEDULES = ("constant", "step", "cosine", "onecycle")


def scheduled_lr(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``.

    constant: ``base_lr`` throughout.
    step:     ``base_lr``, times 0.1 after 50% and again after 75% of the steps.
    cosine:   cosine decay from ``base_lr`` to 0.
    onecycle: cosine warm-up from ``base_lr / 25`` to ``base_lr`` over the first
              30% of the steps, then cosine decay to ``base_lr / 25e4``
              (PyTorch's OneCycleLR defaults).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    progress = step / max(total_steps, 1)
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if schedule == "cosine":
        return base_lr * _cosine_ramp(1.0, 0.0, progress)
    warmup = 0.3
    initial, final = base_lr / 25, base_lr / 25e4
    if progress < warmup:
        return _cosine_ramp(initial, base_lr, progress / warmup)
    return _cosine_ramp(base_lr, final, (progress - warmup) / (1 - warmup))


def _cosine_ramp(start: float, end: float, fraction: float) -> float:
    """Half a cosine from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0)))
