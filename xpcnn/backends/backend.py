"""Choose and describe an array backend: a backend and device request turned into a :class:`Backend`, with
clear errors for each library.

This module, with its two helpers, is where array-library names (``numpy``,
``cupy``, ``array_api_strict``, ``torch``, ``jax``) are known: ``rng.py`` holds
the random-number adapters and ``diagnostics.py`` what ``xpcnn info`` and
``xpcnn bench`` report.  Everything else receives a :class:`Backend` or gets
the namespace from its arrays with ``array_api_compat.array_namespace``.
What differs between libraries is data (:data:`LIBRARIES`), not switches.

A backend bundles:

* ``xp``: the Array API namespace (through ``array_api_compat``);
* ``device``: the device that new arrays are created on;
* ``asarray`` / ``to_host``: the only host <-> device moves;
* ``generator(*seed)``: a seeded random generator adapter (``rng.py``), the
  standard having no random module;
* ``synchronize()``: wait for queued device work (a no-op where nothing is
  queued: NumPy, array-api-strict, torch on the CPU).

Creating the JAX backend turns on JAX's 64-bit mode (``jax_enable_x64``),
process-wide: without it JAX silently computes float64 requests in float32.
xpcnn passes every dtype explicitly, so float32 code computes the same either
way.  It also sets ``jax_default_matmul_precision`` to ``"highest"``: on NVIDIA
GPUs JAX otherwise multiplies float32 matrices in TF32 (about 1e-3 relative
error), where every other backend computes in full float32.

:func:`set_tf32` is the one switch for that math mode: it lets float32 matrix
products on NVIDIA GPUs (Ampere and newer) run on TF32 tensor cores, inputs
rounded to 10 mantissa bits, in CuPy, torch and JAX alike.  It is off unless
asked for (``--tf32``), and does nothing on CPUs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ..base.errors import XpcnnError, one_line
from ..base.rng import CupyGenerator, HostGenerator, JaxGenerator, TorchGenerator, host_dtype

BACKEND_NAMES = ("numpy", "array-api-strict", "cupy", "torch", "jax")
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")


# None: never set, each library keeps its own default (JAX: "highest", set below).
_tf32: bool | None = None


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for float32 matrix products on NVIDIA GPUs, process-wide, in every backend.

    Applies at once to CuPy, torch and JAX if they are imported, and to backends created later.
    """
    global _tf32
    _tf32 = bool(enabled)
    for name in _TF32_SWITCHES:
        if name in sys.modules:
            _apply_tf32(name)


def _jax_tf32() -> None:
    # Always set, TF32 or not: JAX's own default on GPUs is TF32.
    precision = "tensorfloat32" if _tf32 else "highest"
    sys.modules["jax"].config.update("jax_default_matmul_precision", precision)


def _torch_tf32() -> None:
    if _tf32 is None:
        return
    # torch's own defaults differ: TF32 for cuDNN convolutions, full float32 for matmuls.
    backends = sys.modules["torch"].backends
    backends.cuda.matmul.fp32_precision = backends.cudnn.conv.fp32_precision = "tf32" if _tf32 else "ieee"


def _cupy_tf32() -> None:
    if _tf32 is None:
        return
    # CUPY_TF32 is read once, at the first float32 matmul; this sets the same switch at any time.
    from cupy._core import _routines_linalg as linalg

    mode = linalg.COMPUTE_TYPE_TF32 if _tf32 else linalg.COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(sys.modules["cupy"].float32, mode)


_TF32_SWITCHES = {"jax": _jax_tf32, "torch": _torch_tf32, "cupy": _cupy_tf32}


def _apply_tf32(name: str) -> None:
    """Put library ``name`` (already imported) in the math mode :func:`set_tf32` chose."""
    _TF32_SWITCHES[name]()


class BackendError(XpcnnError, RuntimeError):
    """A backend or device that was asked for cannot be had here."""


def _cupy_activate(backend: Backend):
    return backend.device


def _torch_activate(backend: Backend):
    if not backend.is_gpu:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(backend.device)


def _jax_activate(backend: Backend):
    import jax

    return jax.default_device(backend.device)


def _cupy_synchronize(backend: Backend) -> None:
    backend.device.synchronize()


def _torch_synchronize(backend: Backend) -> None:
    if backend.is_gpu:
        import torch

        torch.cuda.synchronize(backend.device)


def _jax_synchronize(backend: Backend) -> None:
    import jax

    # JAX queues work on the CPU too and has no device-wide barrier: wait for every
    # array that still exists, which covers all work whose result can still be read.
    jax.block_until_ready(jax.live_arrays())


def _jax_to_device(host_array: np.ndarray, backend: Backend):
    import jax

    # A transfer: jnp.asarray(..., device=) would compile two one-operation programs per new shape.
    return jax.device_put(host_array, backend.device)


def _to_device(host_array: np.ndarray, backend: Backend):
    with backend.activate():
        return backend.xp.asarray(host_array, device=backend.device)


@dataclass(frozen=True)
class Library:
    """What differs between array libraries behind the one :class:`Backend` interface."""

    generator: type = HostGenerator  # the rng adapter
    activate: Callable[[Backend], Any] = lambda backend: contextlib.nullcontext()
    synchronize: Callable[[Backend], None] = lambda backend: None  # nothing queued: NumPy, array-api-strict
    # torch would share the NumPy memory on the CPU, and it refuses negative strides: it gets a private C copy.
    needs_private_copy: bool = False
    to_device: Callable[[np.ndarray, Backend], Any] = _to_device  # a host array onto the backend's device


LIBRARIES = {
    "numpy": Library(),
    "array-api-strict": Library(),
    "cupy": Library(CupyGenerator, _cupy_activate, _cupy_synchronize),
    "torch": Library(TorchGenerator, _torch_activate, _torch_synchronize, needs_private_copy=True),
    "jax": Library(JaxGenerator, _jax_activate, _jax_synchronize, to_device=_jax_to_device),
}


@dataclass(frozen=True)
class Backend:
    """An array namespace plus the device its arrays live on."""

    name: str
    xp: Any
    device: Any
    device_name: str

    @property
    def is_gpu(self) -> bool:
        return self.device_name.startswith("cuda")

    @property
    def library(self) -> Library:
        return LIBRARIES[self.name]

    def asarray(self, host_array, dtype=None):
        """Copy a host (NumPy) array to this backend's device, optionally casting."""
        host_array = np.asarray(host_array)
        if dtype is not None:
            host_array = host_array.astype(host_dtype(dtype), copy=False)
        if self.library.needs_private_copy:
            host_array = np.array(host_array, order="C")
        return self.library.to_device(host_array, self)

    def to_host(self, array) -> np.ndarray:
        """Copy an array of this backend to a NumPy array on the host."""
        return to_host(array)

    def generator(self, *seed: int):
        """A random generator adapter (:mod:`xpcnn.base.rng`) seeded by ``seed`` (e.g. run seed, epoch, step)."""
        return self.library.generator(self, seed)

    def activate(self):
        """Context in which bare creation calls land on this backend's device."""
        return self.library.activate(self)

    def synchronize(self) -> None:
        """Block until queued device work is done (no-op where nothing is queued)."""
        self.library.synchronize(self)

    def describe(self) -> str:
        return f"{self.name} on {self.device_name}"

    def __str__(self) -> str:
        return self.describe()


_NAMESPACE_OF_TYPE: dict[type, Any] = {}


def namespace(*arrays):
    """``array_api_compat.array_namespace(*arrays)``, looked up by type when all arrays share one.

    The layers ask for the namespace of their arrays dozens of times a step, and
    on a GPU the step's host time is what bounds it; array_namespace inspects
    every array each time.  Mixed types (an error, or a deliberate mix) take
    array_namespace's own path.
    """
    kind = type(arrays[0])
    if all(type(a) is kind for a in arrays[1:]):
        xp = _NAMESPACE_OF_TYPE.get(kind)
        if xp is None:
            xp = _NAMESPACE_OF_TYPE[kind] = array_api_compat.array_namespace(*arrays)
        return xp
    return array_api_compat.array_namespace(*arrays)


def to_host(array) -> np.ndarray:
    """Copy any supported backend's array to a NumPy array on the host.

    Always a copy, never a view of the array's memory (which NumPy and torch on
    the CPU would give): layers and optimisers update parameters and buffers in
    place, and a host snapshot (a ``state_dict``) must not follow them.
    """
    if isinstance(array, np.ndarray | np.generic):
        return np.array(array)
    if array_api_compat.is_cupy_array(array):
        return array.get()
    if array_api_compat.is_torch_array(array):
        array = array.detach()
        return array.numpy().copy() if array.device.type == "cpu" else array.cpu().numpy()
    if _is_strict_array(array):
        import array_api_strict

        return np.array(array.to_device(array_api_strict.Device("CPU_DEVICE")))
    return np.array(array)


def beyond_range(host_array, dtype) -> bool:
    """Whether a float host array holds values too large for the float ``dtype`` (any namespace's) it is to be
    cast to, which the cast would turn into infinities (a float64 checkpoint's 1e300 loaded as float32)."""
    host_array, target = np.asarray(host_array), host_dtype(dtype)
    if host_array.dtype.kind != "f" or target.kind != "f" or host_array.size == 0:
        return False
    return bool(np.max(np.abs(host_array)) > np.finfo(target).max)


def _is_strict_array(array) -> bool:
    return type(array).__module__.startswith("array_api_strict")


def _import(module: str, what: str, install: str = ""):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"; install it with: {install}" if install else ""
        raise BackendError(
            f"{what} needs the Python package '{module}', which is not installed ({exc}){hint}"
        ) from None


TORCH_INSTALL = "pip install torch==2.13.0 (the CPU build; CUDA builds: https://pytorch.org/get-started)"
JAX_INSTALL = "pip install jax (the CPU build), or pip install 'jax[cuda12]' for NVIDIA GPUs"


def _numpy_backend() -> Backend:
    return Backend("numpy", array_api_compat.array_namespace(np.empty(0)), "cpu", "cpu")


def _strict_backend(device=None) -> Backend:
    strict = _import("array_api_strict", "the array-api-strict backend")
    device = strict.Device("CPU_DEVICE") if device is None else device
    return Backend("array-api-strict", strict, device, "cpu")


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when CuPy and a GPU both work."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return "CuPy is not installed (pip install 'xpcnn[cuda12]' or 'xpcnn[cuda13]')"
    except Exception as exc:  # a broken CUDA install raises all sorts at import
        return f"CuPy failed to import: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy cannot talk to a GPU: {str(exc).strip()}"
    if count == 0:
        return "no CUDA GPU is visible"
    return None


def _cupy_backend(index: int) -> Backend:
    problem = cuda_problem()
    if problem is not None:
        raise BackendError(f"cannot use cuda:{index}: {problem}")
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= index < count:
        raise BackendError(f"cannot use cuda:{index}: only {count} GPU(s) visible (cuda:0..cuda:{count - 1})")
    _apply_tf32("cupy")
    return Backend("cupy", array_api_compat.array_namespace(cupy.empty(0)), cupy.cuda.Device(index), f"cuda:{index}")


def _torch_backend(device) -> Backend:
    """The torch backend on a ``torch.device``."""
    torch = _import("torch", "the torch backend", TORCH_INSTALL)
    name = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    _apply_tf32("torch")
    return Backend("torch", array_api_compat.array_namespace(torch.empty(0)), device, name)


def torch_cuda_problem(torch) -> str | None:
    """Why torch cannot use CUDA here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return None


def _get_torch_backend(device: str) -> Backend:
    torch = _import("torch", "the torch backend", TORCH_INSTALL)
    if device == "auto":
        device = "cpu" if torch_cuda_problem(torch) else "cuda"
    if device == "cpu":
        return _torch_backend(torch.device("cpu"))
    index = _parse_cuda_index(device)
    problem = torch_cuda_problem(torch)
    if problem is not None:
        raise BackendError(f"cannot use cuda:{index} with torch: {problem}")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise BackendError(f"cannot use cuda:{index}: torch sees only {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return _torch_backend(torch.device("cuda", index))


def jax_gpus(jax) -> list:
    """JAX's GPU devices (empty when its installed jaxlib has no GPU platform, or JAX_PLATFORMS leaves it out:
    then JAX raises RuntimeError, or a bare AssertionError where it names a platform this jaxlib lacks)."""
    try:
        return jax.devices("gpu")
    except (RuntimeError, AssertionError):
        return []


def _jax_cpu(jax):
    """This process's JAX CPU device (data parallel: one of several); BackendError where JAX cannot start on it."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except (RuntimeError, AssertionError) as exc:
        platforms = os.environ.get("JAX_PLATFORMS")
        why = f"JAX_PLATFORMS={platforms!r} leaves it out" if platforms else one_line(exc) or type(exc).__name__
        raise BackendError(f"cannot use the CPU with jax: {why}") from None


def _jax_backend(device) -> Backend:
    """The JAX backend on a ``jax.Device``."""
    jax = _import("jax", "the jax backend", JAX_INSTALL)
    jax.config.update("jax_enable_x64", True)  # float64 for gradient checks; see the module docstring
    _apply_tf32("jax")  # no silent TF32 on GPUs unless asked for; see the docstring
    name = "cpu" if device.platform == "cpu" else f"cuda:{jax_gpus(jax).index(device)}"
    return Backend("jax", array_api_compat.array_namespace(jax.numpy.empty(0, device=device)), device, name)


def _get_jax_backend(device: str) -> Backend:
    jax = _import("jax", "the jax backend", JAX_INSTALL)
    gpus = jax_gpus(jax)
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cpu":
        return _jax_backend(_jax_cpu(jax))
    index = _parse_cuda_index(device)
    if not gpus:
        raise BackendError(
            f"cannot use cuda:{index} with jax: this jaxlib has no GPU platform (pip install 'jax[cuda12]')"
        )
    if not 0 <= index < len(gpus):
        raise BackendError(f"cannot use cuda:{index}: jax sees only {len(gpus)} GPU(s) (cuda:0..cuda:{len(gpus) - 1})")
    return _jax_backend(gpus[index])


def _parse_cuda_index(device: str) -> int:
    if device == "cuda":
        return 0
    index = device.removeprefix("cuda:")
    if not (index.isascii() and index.isdigit()):
        raise BackendError(f"unknown device {device!r}: expected one of {', '.join(DEVICE_NAMES)}")
    return int(index)


def get_backend(backend: str | None = None, device: str | None = None) -> Backend:
    """Return the backend named by ``backend`` and/or ``device``.

    ``backend`` is one of :data:`BACKEND_NAMES`, or a device name (``"auto"``,
    ``"cpu"``, ``"cuda"``, ``"cuda:N"``) for convenience; ``device`` is a
    device name.  Without a backend, ``"auto"`` (the default) picks CUDA through
    CuPy when CuPy and a GPU work, else NumPy on the CPU; torch and jax with
    ``"auto"`` take their first GPU when they can use one, else the CPU.
    """
    if backend in DEVICE_NAMES or (backend or "").startswith("cuda"):
        if device not in (None, "auto", backend):
            raise BackendError(f"conflicting devices {backend!r} and {device!r}")
        backend, device = None, backend
    device = "auto" if device is None else device
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise BackendError(f"unknown device {device!r}: expected one of {', '.join(DEVICE_NAMES)}")
    if backend is None:
        if device == "auto":
            backend = "cupy" if cuda_problem() is None else "numpy"
        elif device == "cpu":
            backend = "numpy"
        else:
            backend = "cupy"
    if backend == "numpy" or backend == "array-api-strict":
        if device.startswith("cuda"):
            raise BackendError(f"the {backend} backend runs on the CPU only, not on {device}")
        return _numpy_backend() if backend == "numpy" else _strict_backend()
    if backend == "cupy":
        if device == "cpu":
            raise BackendError("the cupy backend runs on CUDA GPUs only, not on the CPU")
        return _cupy_backend(0 if device == "auto" else _parse_cuda_index(device))
    if backend == "torch":
        return _get_torch_backend(device)
    if backend == "jax":
        return _get_jax_backend(device)
    raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKEND_NAMES)}")


def backend_of(array) -> Backend:
    """The backend an existing array belongs to (namespace and device)."""
    if isinstance(array, np.ndarray | np.generic):
        return _numpy_backend()
    if _is_strict_array(array):
        return _strict_backend(array.device)
    if array_api_compat.is_cupy_array(array):
        return _cupy_backend(array.device.id)
    if array_api_compat.is_torch_array(array):
        return _torch_backend(array.device)
    if array_api_compat.is_jax_array(array):
        (device,) = array.devices()
        return _jax_backend(device)
    raise BackendError(f"unsupported array type {type(array).__module__}.{type(array).__name__}")
