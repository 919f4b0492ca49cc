"""Layers, containers and the loss, with hand-written backward passes and PyTorch's layouts.

All implement the one ``Layer`` contract (forward, backward, parameters, modes); each layer is a
thin wrapper over its math in :mod:`xpcnn.functional`.

Each layer has ``forward(x) -> y`` and ``backward(grad_y) -> grad_x``; ``params`` and ``grads`` are dicts
name -> array (``"weight"``, ``"bias"``) that a user may assign to; ``train()`` / ``eval()`` switch modes.
Layers keep what their backward pass needs only in training mode.

Every layer and container (:class:`Sequential`, :class:`Residual`) offer PyTorch's parameter API with
PyTorch's names (``named_parameters()`` -> ``("0.weight", array)``, ..., ``parameters()``,
``named_buffers()``, ``state_dict()``) and its gradient semantics: backward *adds* to the gradients,
``zero_grad()`` clears them (to none, so the next backward assigns instead of adding: no extra operation
in a training step), so gradients of several micro-batches accumulate.

Parameters are created on the host as NumPy float32 arrays; ``layer.to(backend, dtype)`` moves them (see
:mod:`xpcnn.backends.backend`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator

import numpy as np

from . import functional as F
from .backends.backend import Backend, backend_of, beyond_range, get_backend, namespace, to_host
from .base.rng import host_dtype
from .ops.fastpath import kernels

RELU_GAIN = math.sqrt(2.0)
OUTPUT_GAIN = 1.0


def _pair(value, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _host_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _shape_text(shape) -> str:
    return str(tuple(int(s) for s in shape))


class Layer:
    """Base class: parameters, gradients, mode, and input checks."""

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.training = True
        self._cache = None  # what forward keeps for backward, in training mode only

    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_y):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def train(self, mode: bool = True):
        """Switch to training mode (or evaluation mode with ``mode=False``)."""
        self.training = mode
        return self

    def eval(self):
        """Switch to evaluation mode: no dropout, nothing kept for backward."""
        return self.train(False)

    def to(self, backend: Backend | str, dtype=None):
        """Move parameters, gradients and buffers to ``backend`` (or a get_backend name), floats cast to ``dtype``.

        A dropout layer's generator is dropped (it draws on its own backend): set one again for seeded noise."""
        if isinstance(backend, str):
            backend = get_backend(backend)
        if dtype is not None and not backend.xp.isdtype(backend.asarray(np.zeros(()), dtype).dtype, "real floating"):
            raise ValueError(f"{type(self).__name__}.to: dtype must be a real floating dtype, got {dtype}")
        for _, layer in self._holders():
            for store in (layer.params, layer.grads, layer.buffers):
                for name, value in store.items():
                    host = to_host(value)
                    cast = dtype if dtype is not None and host.dtype.kind == "f" else None
                    store[name] = backend.asarray(host, cast)
        self.set_generator(None)  # a generator draws on its own backend: dropout makes one here at its next use
        return self

    def set_generator(self, generator) -> None:
        """Give the layer a random generator adapter (only stochastic layers use it)."""

    def set_communicator(self, communicator) -> None:
        """Give the layer the ranks' :class:`xpcnn.backends.distributed.Communicator` (only batch norm uses it)."""

    def zero_cache(self) -> None:
        """Drop what forward kept for backward."""
        self._cache = None

    # --- parameters, buffers and gradients, named as in PyTorch ---

    def modules(self) -> Iterator[Layer]:
        """This layer and, in a container, every layer inside it, nested containers included."""
        yield self

    def _holders(self, prefix: str = "") -> Iterator[tuple[str, Layer]]:
        """(name prefix, layer) of each layer that holds parameters and buffers: this one (a Sequential: its layers)."""
        yield prefix, self

    def _named(self, store: str) -> Iterator[tuple[str, object]]:
        """(prefixed name, array) of the entries of each holder's dict ``store``, in PyTorch's order."""
        for prefix, layer in self._holders():
            yield from ((prefix + name, value) for name, value in getattr(layer, store).items())

    def named_parameters(self) -> Iterator[tuple[str, object]]:
        """(name, array) of every trainable parameter: ``"weight"``, or ``"0.weight"`` inside a Sequential."""
        return self._named("params")

    def parameters(self) -> Iterator:
        """Every trainable parameter array, in :meth:`named_parameters` order."""
        return (value for _, value in self.named_parameters())

    def named_buffers(self) -> Iterator[tuple[str, object]]:
        """(name, array) of the state that gradients do not train (batch norm's running statistics)."""
        return self._named("buffers")

    def named_gradients(self) -> Iterator[tuple[str, object]]:
        """(name, gradient) of each parameter that has one, named as in :meth:`named_parameters`.

        A gradient is the sum over the backward passes since the last :meth:`zero_grad`.
        """
        return self._named("grads")

    def zero_grad(self) -> None:
        """Drop every gradient (PyTorch's ``set_to_none=True``): the next backward assigns instead of adding."""
        for _, layer in self._holders():
            layer.grads.clear()

    def set_parameters(self, values: dict) -> None:
        """Assign parameters from a dict named as :meth:`named_parameters` (the arrays are used as given).

        Raises ValueError, assigning nothing, on a name the model lacks or a shape other than the parameter's."""
        self._assign("params", "parameter", values)

    def set_buffers(self, values: dict) -> None:
        """Assign buffers from a dict named as :meth:`named_buffers`, checked as :meth:`set_parameters` checks."""
        self._assign("buffers", "buffer", values)

    def _assign(self, store: str, kind: str, values: dict) -> None:
        """Assign ``values`` into the holders' dicts ``store``, once every name and shape has been checked."""
        targets = {
            prefix + name: getattr(layer, store) for prefix, layer in self._holders() for name in getattr(layer, store)
        }
        for key, value in values.items():
            if key not in targets:
                raise ValueError(f"unknown {kind} {key!r} (this model's names: named_{kind}s())")
            held = targets[key][key.rpartition(".")[2]]
            if tuple(value.shape) != tuple(held.shape):
                raise ValueError(
                    f"{kind} {key} has shape {_shape_text(value.shape)}, expected {_shape_text(held.shape)}"
                )
        for key, value in values.items():
            targets[key][key.rpartition(".")[2]] = value

    def num_parameters(self) -> int:
        """The number of trainable scalars."""
        return sum(math.prod(value.shape) for value in self.parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host NumPy copies of parameters and buffers, keyed as in PyTorch (``"0.weight"``, ``"1.running_mean"``)."""
        state = {}
        for prefix, layer in self._holders():
            for store in (layer.params, layer.buffers):
                state.update({prefix + name: to_host(value) for name, value in store.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load host arrays from :meth:`state_dict`, keeping this model's backend and dtypes.

        Raises ValueError on missing or unexpected keys, shape mismatches, values too large for the dtype and
        negative running variances.  The model keeps copies; PyTorch's ``num_batches_tracked`` counts are ignored.
        """
        state = {key: value for key, value in state.items() if key.rpartition(".")[2] != "num_batches_tracked"}
        expected = {}
        for prefix, layer in self._holders():
            for store in (layer.params, layer.buffers):
                expected.update({prefix + name: (store, name) for name in store})
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"state does not fit this model: missing {missing}, unexpected {unexpected}")
        for key, (store, name) in expected.items():
            current, new = store[name], np.asarray(state[key])
            if tuple(current.shape) != new.shape:
                raise ValueError(
                    f"state does not fit this model: {key} has shape {new.shape}, expected {tuple(current.shape)}"
                )
            if beyond_range(new, current.dtype):
                raise ValueError(f"{key} holds values too large for {host_dtype(current.dtype)}")
            if name == "running_var" and bool((new < 0).any()):  # a square's mean: negative only if damaged
                raise ValueError(f"{key} holds negative variances")
        for key, (store, name) in expected.items():
            current = store[name]
            store[name] = backend_of(current).asarray(np.array(state[key]), current.dtype)  # a copy: not the caller's

    def _check_input(self, x, expected: str, rank: int, channels: int | None = None, min_hw=(1, 1)):
        """Raise ValueError naming this layer unless ``x`` is a float array of the expected shape."""
        shape = tuple(x.shape)
        ok = len(shape) == rank
        if ok and channels is not None:
            ok = shape[1] == channels
        if ok and rank == 4:
            ok = shape[2] >= min_hw[0] and shape[3] >= min_hw[1]
        if not ok:
            raise ValueError(f"{self!r}: expected input of shape {expected}, got {_shape_text(shape)}")
        xp = namespace(x)
        if not xp.isdtype(x.dtype, "real floating"):
            raise ValueError(f"{self!r}: expected a floating-point input, got dtype {x.dtype}")
        weight = self.params.get("weight")
        if weight is not None:
            try:
                namespace(x, weight)
            except TypeError:
                raise ValueError(
                    f"{self!r}: input is a {type(x).__module__} array but the parameters are "
                    f"{type(weight).__module__} arrays (move the model with .to(backend))"
                ) from None
            if x.dtype != weight.dtype:
                raise ValueError(f"{self!r}: expected {weight.dtype} input (the parameters' dtype), got {x.dtype}")

    def _set_grads(self, grad_weight, grad_bias) -> None:
        """Add to the weight gradient, and to the bias gradient if the layer has a bias."""
        self._accumulate("weight", grad_weight)
        if "bias" in self.params:
            self._accumulate("bias", grad_bias)

    def _accumulate(self, name: str, grad) -> None:
        """Add ``grad`` to parameter ``name``'s gradient, or store it where there is none (after zero_grad)."""
        held = self.grads.get(name)
        self.grads[name] = grad if held is None else held + grad

    def _need_cache(self, cache):
        if cache is None:
            raise RuntimeError(f"{self!r}: backward() needs a forward() in training mode first")
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""

    def _brief(self) -> str:
        """How a row of :meth:`Sequential.summary` names this layer: its repr (a container: shorter)."""
        return repr(self)


class Conv2d(Layer):
    """2-D convolution (cross-correlation), input (N, C, H, W), weight (O, C, KH, KW)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        *,
        rng=None,
        gain: float = RELU_GAIN,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(in_channels, out_channels, *self.kernel_size, *self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"Conv2d: channels, kernel_size and stride must be >= 1 and padding >= 0, got {in_channels}, "
                f"{out_channels}, {kernel_size}, {stride}, {padding}"
            )
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        shape = (out_channels, in_channels, *self.kernel_size)
        self.params["weight"] = init_normal(_host_rng(rng), shape, fan_in, gain)
        if bias:
            self.params["bias"] = np.zeros(out_channels, np.float32)

    def forward(self, x):
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        min_h, min_w = kh - 2 * ph, kw - 2 * pw
        self._check_input(
            x, f"(N, {self.in_channels}, H, W) with H >= {min_h}, W >= {min_w}", 4, self.in_channels, (min_h, min_w)
        )
        y, cols = kernels(x).conv2d_forward(
            x, self.params["weight"], self.params.get("bias"), self.stride, self.padding
        )
        self._cache = (cols, tuple(x.shape)) if self.training else None
        return y

    def backward(self, grad_y, input_grad: bool = True):
        """Store weight and bias gradients; return grad_x, or None when ``input_grad`` is False."""
        cols, x_shape = self._need_cache(self._cache)
        grad_x, grad_w, grad_b = kernels(grad_y).conv2d_backward(
            grad_y, cols, self.params["weight"], x_shape, self.stride, self.padding, input_grad, "bias" in self.params
        )
        self._set_grads(grad_w, grad_b)
        return grad_x

    def extra_repr(self):
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1):
            text += f", stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if "bias" not in self.params:
            text += ", bias=False"
        return text


class MaxPool2d(Layer):
    """Max pooling over (KH, KW) windows, stride defaults to the kernel size."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"MaxPool2d: kernel_size and stride must be >= 1, got {kernel_size}, {stride}")

    def forward(self, x):
        kh, kw = self.kernel_size
        self._check_input(x, f"(N, C, H, W) with H >= {kh}, W >= {kw}", 4, None, (kh, kw))
        y, record = kernels(x).maxpool2d_forward(x, self.kernel_size, self.stride, record=self.training)
        self._cache = (record, tuple(x.shape)) if self.training else None
        return y

    def backward(self, grad_y):
        record, x_shape = self._need_cache(self._cache)
        return kernels(grad_y).maxpool2d_backward(grad_y, record, x_shape, self.kernel_size, self.stride)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class GlobalAvgPool2d(Layer):
    """The mean of each channel over its H x W map: (N, C, H, W) -> (N, C), as PyTorch's
    ``AdaptiveAvgPool2d(1)`` followed by ``Flatten``."""

    def forward(self, x):
        self._check_input(x, "(N, C, H, W)", 4)
        self._cache = tuple(x.shape) if self.training else None
        return F.global_avgpool2d_forward(x)

    def backward(self, grad_y):
        return F.global_avgpool2d_backward(grad_y, self._need_cache(self._cache))


class ReLU(Layer):
    """max(x, 0), elementwise."""

    def forward(self, x):
        xp = namespace(x)
        if not xp.isdtype(x.dtype, "real floating"):
            raise ValueError(f"{self!r}: expected a floating-point input, got dtype {x.dtype}")
        y = xp.maximum(x, 0.0)
        self._cache = y if self.training else None
        return y

    def backward(self, grad_y):
        return kernels(grad_y).relu_backward(grad_y, self._need_cache(self._cache))


class Flatten(Layer):
    """(N, ...) -> (N, prod(...)) in C order, as PyTorch's nn.Flatten."""

    def forward(self, x):
        xp = namespace(x)
        if x.ndim < 2:
            raise ValueError(
                f"{self!r}: expected input of shape (N, ...) with at least 2 axes, got {_shape_text(x.shape)}"
            )
        self._cache = tuple(x.shape)
        return xp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))  # not -1: ambiguous for an empty batch

    def backward(self, grad_y):
        xp = namespace(grad_y)
        return xp.reshape(grad_y, self._need_cache(self._cache))


class Linear(Layer):
    """Affine map, input (N, in_features), weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rng=None, gain: float = RELU_GAIN):
        super().__init__()
        if min(in_features, out_features) < 1:
            raise ValueError(f"Linear: in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.params["weight"] = init_normal(_host_rng(rng), (out_features, in_features), in_features, gain)
        if bias:
            self.params["bias"] = np.zeros(out_features, np.float32)

    def forward(self, x):
        self._check_input(x, f"(N, {self.in_features})", 2, self.in_features)
        self._cache = x if self.training else None
        return F.linear_forward(x, self.params["weight"], self.params.get("bias"))

    def backward(self, grad_y, input_grad: bool = True):
        """Store weight and bias gradients; return grad_x, or None when ``input_grad`` is False."""
        x = self._need_cache(self._cache)
        grad_x, grad_w, grad_b = F.linear_backward(grad_y, x, self.params["weight"], input_grad)
        self._set_grads(grad_w, grad_b)
        return grad_x

    def extra_repr(self):
        bias = "" if "bias" in self.params else ", bias=False"
        return f"{self.in_features}, {self.out_features}{bias}"


class _BatchNorm(Layer):
    """Batch normalisation over all axes but the channel axis 1, PyTorch's conventions.

    Training normalises with the batch's mean and biased variance and updates running estimates (unbiased
    variance) with ``momentum``; evaluation uses the running estimates.  weight (gamma) starts at 1, bias (beta) at 0.
    """

    rank = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if num_features < 1 or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0 or eps <= 0:
            raise ValueError(  # momentum None, PyTorch's cumulative average, is not offered
                f"{type(self).__name__}: num_features must be >= 1, momentum a number in [0, 1] and eps > 0"
            )
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.params["weight"] = np.ones(num_features, np.float32)
        self.params["bias"] = np.zeros(num_features, np.float32)
        self.buffers["running_mean"] = np.zeros(num_features, np.float32)
        self.buffers["running_var"] = np.ones(num_features, np.float32)
        self.communicator = None  # several ranks: statistics over the global batch (set_communicator)

    def set_communicator(self, communicator) -> None:
        self.communicator = communicator if communicator is not None and communicator.world_size > 1 else None

    def _expected(self) -> str:
        return "(N, C)" if self.rank == 2 else "(N, C, H, W)"

    def forward(self, x):
        if not self.training:
            self._check_input(x, self._expected().replace("C", str(self.num_features)), self.rank, self.num_features)
            self._cache = None
            weight, bias = self.params["weight"], self.params["bias"]
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
            return F.batchnorm_inference(x, weight, bias, mean, var, self.eps)
        y, statistics = self.normalize(x)
        update_running_statistics([(self, statistics)])
        return y

    def normalize(self, x):
        """The training-mode forward pass without the running statistics' update.

        Returns (y, (mean (C,), biased variance (C,), values per channel)): what
        :func:`update_running_statistics` folds into the running estimates, in one update
        for all of a :class:`Sequential`'s batch-norm layers.
        """
        self._check_input(x, self._expected().replace("C", str(self.num_features)), self.rank, self.num_features)
        weight, bias = self.params["weight"], self.params["bias"]
        if self.communicator is not None:
            y, x_hat, inv_std, mean, var, count = F.sync_batchnorm_forward(
                x, weight, bias, self.eps, self.communicator.all_reduce_sum, self.communicator.world_size
            )
        else:
            count = math.prod(x.shape) // x.shape[1]
            if count >= 2:
                y, x_hat, inv_std, mean, var = kernels(x).batchnorm_forward(x, weight, bias, self.eps)
        if count < 2:
            raise ValueError(
                f"{self!r}: training needs more than one value per channel, got input {_shape_text(x.shape)}"
            )
        self._cache = (x_hat, inv_std, count)
        return y, (mean, var, count)

    def backward(self, grad_y, input_grad: bool = True):
        """Store weight and bias gradients; return grad_x, or None when ``input_grad`` is False."""
        x_hat, inv_std, count = self._need_cache(self._cache)
        if self.communicator is not None:
            grad_x, grad_weight, grad_bias = F.sync_batchnorm_backward(
                grad_y, x_hat, inv_std, self.params["weight"], count, self.communicator.all_reduce_sum
            )
        else:
            grad_x, grad_weight, grad_bias = kernels(grad_y).batchnorm_backward(
                grad_y, x_hat, inv_std, self.params["weight"]
            )
        self._set_grads(grad_weight, grad_bias)
        return grad_x if input_grad else None

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def update_running_statistics(batch_statistics: list) -> None:
    """Fold each (layer, (mean, variance, count)) from :meth:`_BatchNorm.normalize` into the layer's running estimates.

    As PyTorch: running = (1 - momentum) * running + momentum * batch value, the variance made unbiased (times
    count / (count - 1)); every layer's buffers in one update (see :func:`xpcnn.functional.moving_averages`).
    """
    averages, values, weights = [], [], []
    for layer, (mean, var, count) in batch_statistics:
        averages += [layer.buffers["running_mean"], layer.buffers["running_var"]]
        values += [mean, var]
        weights += [(layer.momentum, 1.0), (layer.momentum, count / (count - 1))]
    updated = iter(kernels(values[0]).moving_averages(averages, values, tuple(weights)))
    for layer, _ in batch_statistics:
        layer.buffers["running_mean"], layer.buffers["running_var"] = next(updated), next(updated)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) features."""

    rank = 2


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) feature maps, per channel."""

    rank = 4


class Dropout(Layer):
    """Zero each input with probability ``p`` in training and scale the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.generator = None

    def set_generator(self, generator):
        self.generator = generator

    def forward(self, x):
        xp = namespace(x)
        if not xp.isdtype(x.dtype, "real floating"):
            raise ValueError(f"{self!r}: expected a floating-point input, got dtype {x.dtype}")
        if not self.training or self.p == 0.0:
            self._cache = None
            return x
        if self.generator is None:
            self.generator = backend_of(x).generator(int(np.random.SeedSequence().entropy % 2**63))
        uniform = self.generator.random(tuple(x.shape), x.dtype)
        y, self._cache = kernels(x).dropout_forward(x, uniform, self.p)  # the cache is the scaled mask
        return y

    def backward(self, grad_y):
        if self._cache is None and (not self.training or self.p == 0.0):  # the forward was the identity
            return grad_y
        return grad_y * self._need_cache(self._cache)  # the forward's mask, even if the mode changed since

    def extra_repr(self):
        return f"p={self.p}"


class _Container(Layer):
    """What every container shares: it holds no ``params`` / ``grads`` / ``buffers`` dicts of its own,
    its children do, named as PyTorch names a module's submodules (:meth:`named_children`), and
    modes, generators, communicators, caches, names and summaries reach every child."""

    def named_children(self) -> list[tuple[str, Layer]]:
        """(name, layer) of each child, in the order of the parameter names."""
        raise NotImplementedError

    def _refuse_shared_layers(self) -> None:
        """ValueError where one layer object sits at two places: it keeps one forward's input for its backward,
        so a second use would give the first wrong gradients (PyTorch's weight tying is not offered)."""
        seen = set()
        for module in self.modules():
            if id(module) in seen:
                raise ValueError(f"{module!r} is used twice in the model: give each place a layer of its own")
            seen.add(id(module))

    def _trace(self, x) -> Iterator:
        """Each child's output for input ``x`` (:meth:`output_shapes`: one per row of :meth:`summary`)."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        for _, layer in self.named_children():
            layer.train(mode)
        self.training = mode
        return self

    def set_generator(self, generator):
        for _, layer in self.named_children():
            layer.set_generator(generator)

    def set_communicator(self, communicator):
        for _, layer in self.named_children():
            layer.set_communicator(communicator)

    def zero_cache(self):
        self._cache = None
        for _, layer in self.named_children():
            layer.zero_cache()

    def modules(self) -> Iterator[Layer]:
        yield self
        for _, layer in self.named_children():
            yield from layer.modules()

    def _holders(self, prefix: str = "") -> Iterator[tuple[str, Layer]]:
        for name, layer in self.named_children():
            yield from layer._holders(f"{prefix}{name}.")

    def summary(self, input_shape: tuple[int, ...] | None = None) -> str:
        """A table of the children, their output shapes and parameter counts, and the totals (like Keras).

        ``input_shape`` is one sample's shape, e.g. ``(1, 28, 28)``: output shapes come from one
        forward pass of a zero batch of one in evaluation mode (every layer's mode and cache are
        restored after).  Without it the table has no output shapes.
        """
        rows = [("#", "Layer", *(("Output shape",) if input_shape else ()), "Params")]
        shapes = self.output_shapes(input_shape) if input_shape else None
        for index, (name, layer) in enumerate(self.named_children()):
            shape = ("(None, " + ", ".join(str(s) for s in shapes[index][1:]) + ")",) if shapes else ()
            rows.append((name, layer._brief(), *shape, f"{layer.num_parameters():,}"))
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines = [
            "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)), row[-1].rjust(widths[-1])])
            for row in rows
        ]
        rule = "-" * len(max(lines, key=len))
        trainable = self.num_parameters()
        buffers = sum(math.prod(value.shape) for _, value in self.named_buffers())
        totals = [f"Total parameters: {trainable:,}"] + ([f"Buffers (not trained): {buffers:,}"] if buffers else [])
        return "\n".join([lines[0], rule, *lines[1:], rule, *totals])

    def output_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The output shape of each child for a zero input of shape ``(1, *input_shape)``, in evaluation mode."""
        first = next(self.parameters(), None)
        backend = backend_of(first) if first is not None else get_backend("numpy")
        dtype = first.dtype if first is not None else backend.xp.float32
        x = backend.asarray(np.zeros((1, *input_shape), np.float32), dtype)
        saved = [(module, module.training, vars(module).get("_cache")) for module in self.modules()]
        try:
            self.eval()
            return [tuple(int(s) for s in y.shape) for y in self._trace(x)]
        finally:
            for module, mode, cache in saved:  # modes and caches: a training forward's backward may still follow
                module.training, module._cache = mode, cache


class Sequential(_Container):
    """Layers applied in order; parameters named ``"<index>.<name>"`` as in PyTorch.

    A container (see :class:`Residual` for the other): its layers hold the ``params`` / ``grads`` / ``buffers``
    dicts, and :meth:`named_parameters`, :meth:`named_gradients` and :meth:`state_dict` gather theirs.
    """

    def __init__(self, *layers: Layer):
        self.layers = list(layers)
        self.training, self._cache = True, None  # the last training forward's output's type, shape and dtype
        self._refuse_shared_layers()

    def forward(self, x):
        """Each layer's forward pass in turn; the batch-norm layers' running statistics (training mode)
        are updated together at the end, in one update (:func:`update_running_statistics`)."""
        batch_statistics = []
        try:
            for layer in self.layers:
                if isinstance(layer, _BatchNorm) and layer.training:
                    x, statistics = layer.normalize(x)
                    batch_statistics.append((layer, statistics))
                else:
                    x = layer.forward(x)
        except BaseException:
            self.zero_cache()  # a backward now is refused, instead of mixing this forward's caches with the last's
            raise
        if batch_statistics:
            update_running_statistics(batch_statistics)
        self._cache = (type(x), tuple(x.shape), x.dtype) if self.training else None
        return x

    def backward(self, grad_y, input_grad: bool = True):
        """Backpropagate ``grad_y`` through every layer, storing parameter gradients.

        Returns the gradient with respect to the input, or None with ``input_grad=False`` (training needs no
        input gradient: the layers before the first one with parameters are then skipped, and that one computes
        only its parameter gradients).  ``grad_y`` must have the last training forward's output's shape, dtype
        and array type."""
        if self._cache is not None and (type(grad_y), tuple(grad_y.shape), grad_y.dtype) != self._cache:
            kind, shape, dtype = self._cache  # the type first: another library's dtypes compare with a warning
            got = f"{_shape_text(grad_y.shape)} {grad_y.dtype} {type(grad_y).__name__}"
            expected = f"{_shape_text(shape)} {dtype} {kind.__name__} (the last forward's output)"
            raise ValueError(f"{self._brief()}: gradient of shape, dtype and type {got}, expected {expected}")
        first = (
            0 if input_grad else next((i for i, layer in enumerate(self.layers) if _has_parameters(layer)), len(self))
        )
        for index in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[index]
            if index == first and not input_grad:
                return layer.backward(grad_y, input_grad=False)
            grad_y = layer.backward(grad_y)
        return grad_y if input_grad else None

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def named_children(self) -> list[tuple[str, Layer]]:
        return [(str(index), layer) for index, layer in enumerate(self.layers)]

    def _trace(self, x) -> Iterator:
        for layer in self.layers:
            x = layer.forward(x)
            yield x

    def extra_repr(self):
        return ", ".join(repr(layer) for layer in self.layers)

    def _brief(self) -> str:
        return f"Sequential({len(self)} layers)"


class Residual(_Container):
    """``branch(x) + shortcut(x)``: the shortcut is the identity, or ``projection`` where the shapes differ.

    ``branch`` and ``projection`` are layers or containers (a :class:`Sequential`: e.g. convolution,
    batch norm, ReLU, convolution, batch norm; a stride-2 1x1 :class:`Conv2d`, optionally followed by a
    :class:`BatchNorm2d`).  Parameters are named ``"branch.<name>"`` and ``"projection.<name>"``
    (``"branch.0.weight"``, ``"projection.weight"``): those of a PyTorch module whose attributes
    ``branch`` and ``projection`` (registered in that order) hold the same layers.  Backward sums
    the gradients of the two paths.  No activation follows the sum: put a :class:`ReLU` after the
    block as ResNet does.
    """

    def __init__(self, branch: Layer, projection: Layer | None = None):
        self.branch, self.projection = branch, projection
        self.training = True
        self._refuse_shared_layers()

    def forward(self, x):
        y = self.branch.forward(x)
        shortcut = x if self.projection is None else self.projection.forward(x)
        if tuple(y.shape) != tuple(shortcut.shape):
            which = "the identity shortcut" if self.projection is None else "the projection"
            raise ValueError(
                f"Residual: the branch gives {_shape_text(y.shape)} but {which} gives {_shape_text(shortcut.shape)}"
                f" for input {_shape_text(x.shape)}"
                + (": give a projection that maps the input to the branch's shape" if self.projection is None else "")
            )
        return y + shortcut

    def backward(self, grad_y, input_grad: bool = True):
        """Backpropagate ``grad_y`` through both paths, storing their parameter gradients; return the sum of
        their input gradients, or None when ``input_grad`` is False (each path then computes only its
        parameter gradients)."""
        grad_x = _backward(self.branch, grad_y, input_grad)
        if self.projection is not None:
            shortcut = _backward(self.projection, grad_y, input_grad)
        else:
            shortcut = grad_y
        return grad_x + shortcut if input_grad else None

    def named_children(self) -> list[tuple[str, Layer]]:
        return [("branch", self.branch)] + ([("projection", self.projection)] if self.projection is not None else [])

    def _trace(self, x) -> Iterator:
        for _, layer in self.named_children():
            yield layer.forward(x)

    def extra_repr(self):
        return repr(self.branch) + ("" if self.projection is None else f", projection={self.projection!r}")

    def _brief(self) -> str:
        projection = "" if self.projection is None else f", projection={self.projection._brief()}"
        return f"Residual({self.branch._brief()}{projection})"


def _has_parameters(layer: Layer) -> bool:
    return next(layer.parameters(), None) is not None


def _backward(layer: Layer, grad_y, input_grad: bool):
    """``layer.backward(grad_y)``; with ``input_grad`` False only the parameter gradients (none: nothing runs)."""
    if input_grad:
        return layer.backward(grad_y)
    if _has_parameters(layer):
        layer.backward(grad_y, input_grad=False)
    return None


def recalibrate_batchnorm(model: Sequential, batches: Iterable) -> None:
    """Set every batch-norm layer's running statistics to their averages over ``batches``, weighted by batch size.

    ``batches`` yields model inputs, e.g. the training images without augmentation: after training on
    augmented images the running statistics describe those, while evaluation sees plain ones.  Runs
    forward passes only, with the batch-norm layers in training mode and every other layer (dropout)
    in evaluation mode; leaves the model in evaluation mode.  ValueError where ``batches`` yields none; then,
    or where a batch fails, the running statistics are left as they were.
    """
    norms = [layer for layer in model.modules() if isinstance(layer, _BatchNorm)]
    if not norms:
        return
    momenta, before = [layer.momentum for layer in norms], [dict(layer.buffers) for layer in norms]
    model.eval()
    for layer in norms:
        layer.train()
        layer.momentum = 1.0  # each batch's statistics replace the running ones; the average is taken here
        # finite starting values: with momentum 1 they are multiplied by 0, which a NaN would survive
        xp = namespace(layer.buffers["running_mean"])
        layer.buffers["running_mean"] = xp.zeros_like(layer.buffers["running_mean"])
        layer.buffers["running_var"] = xp.ones_like(layer.buffers["running_var"])
    sums, seen = None, 0
    try:
        for x in batches:
            count = int(x.shape[0])
            model.forward(x)
            batch = [layer.buffers[name] * count for layer in norms for name in ("running_mean", "running_var")]
            sums = batch if sums is None else [total + value for total, value in zip(sums, batch, strict=True)]
            seen += count
        if sums is None:
            raise ValueError("recalibrate_batchnorm: no batches to estimate the statistics on")
        averages = iter(total / seen for total in sums)
        for layer in norms:
            layer.buffers["running_mean"], layer.buffers["running_var"] = next(averages), next(averages)
    except BaseException:
        for layer, buffers in zip(norms, before, strict=True):
            layer.buffers.update(buffers)
        raise
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
        model.eval()
        model.zero_cache()


class CrossEntropyLoss:
    """Softmax + cross-entropy, mean over the batch; logits (N, K), integer labels (N,).

    ``label_smoothing`` e trains against (1 - e) * one_hot + e / K (PyTorch's definition).  ``check_labels=False``
    skips the label-range check, which reads a value back to the host (a device sync); the trainer validates labels
    once instead.
    """

    def __init__(self, check_labels: bool = True, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.check_labels = check_labels
        self.label_smoothing = label_smoothing
        self._grad = None

    def forward(self, logits, labels):
        try:
            xp = namespace(logits, labels)
        except TypeError:
            raise ValueError(
                f"CrossEntropyLoss: logits ({type(logits).__module__}.{type(logits).__name__}) and labels "
                f"({type(labels).__module__}.{type(labels).__name__}) must be arrays of one library, the model's"
            ) from None
        if logits.ndim != 2:
            raise ValueError(f"CrossEntropyLoss: expected logits of shape (N, K), got {_shape_text(logits.shape)}")
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"CrossEntropyLoss: expected labels of shape ({logits.shape[0]},), got {_shape_text(labels.shape)}"
            )
        if logits.shape[0] == 0:
            raise ValueError("CrossEntropyLoss: expected at least one sample, got an empty batch")
        if not xp.isdtype(labels.dtype, "integral"):
            raise ValueError(f"CrossEntropyLoss: expected integer labels, got dtype {labels.dtype}")
        if not xp.isdtype(logits.dtype, "real floating"):
            raise ValueError(f"CrossEntropyLoss: expected floating-point logits, got dtype {logits.dtype}")
        if self.check_labels and labels.shape[0] > 0:
            low, high = int(xp.min(labels)), int(xp.max(labels))
            if low < 0 or high >= logits.shape[1]:
                raise ValueError(
                    f"CrossEntropyLoss: labels must lie in [0, {logits.shape[1] - 1}], got values in [{low}, {high}]"
                )
        loss, self._grad = kernels(logits).cross_entropy(logits, labels, self.label_smoothing)
        return loss

    __call__ = forward

    def backward(self):
        """Gradient of the last loss with respect to the logits, (N, K)."""
        if self._grad is None:
            raise RuntimeError("CrossEntropyLoss: backward() needs a forward() first")
        return self._grad


def init_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, gain: float) -> np.ndarray:
    """Normal float32 weights with std gain / sqrt(fan_in).

    gain sqrt(2) (He) keeps activations' scale through layers followed by ReLU;
    gain 1 (LeCun) suits an output layer, whose logits no ReLU halves.
    """
    return (rng.standard_normal(shape) * (gain / math.sqrt(fan_in))).astype(np.float32)
