"""Shared fixtures: one backend fixture that every backend-agnostic test runs on."""

import signal
import sys
from pathlib import Path

import pytest
from helpers import MNIST_DIR, write_synthetic_mnist

from xpcnn.backends import backend as backend_module
from xpcnn.backends.backend import Backend, BackendError, cuda_problem, get_backend

# The CPU backends run everywhere their package is installed; the GPU ones where a GPU is visible.
# JAX dispatches each operation eagerly at a few milliseconds apiece: its cases are slow (`pytest -m "not slow"`).
BACKEND_PARAMS = [
    "numpy",
    "array-api-strict",
    "torch",
    pytest.param("jax", marks=pytest.mark.slow),
    "cupy",
    "torch-cuda",
    pytest.param("jax-cuda", marks=pytest.mark.slow),
]


@pytest.fixture(scope="session", autouse=True)
def signals_as_in_a_terminal():
    """Ctrl-C, SIGTERM and SIGHUP delivered as in a terminal, however pytest was started.

    A shell starts a background job (`cmd &` in a script, `nohup`) with SIGINT ignored, and xpcnn keeps an
    ignored signal ignored, as it should; the stop tests, and the ranks they launch, need them delivered.
    """
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # nohup ignores it
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def make_backend(name: str) -> Backend:
    """The named backend, or skip the test where it cannot run here."""
    if name == "array-api-strict":
        strict = pytest.importorskip("array_api_strict")
        # A second, non-default device: an array created without device= lands on
        # CPU_DEVICE and mixing the two raises, which catches forgotten device= arguments.
        return Backend("array-api-strict", strict, strict.Device("device1"), "cpu")
    if name == "cupy":
        problem = cuda_problem()
        if problem is not None:
            pytest.skip(problem)
    if name in ("torch", "jax"):
        pytest.importorskip(name)
        return get_backend(name, "cpu")
    if name in ("torch-cuda", "jax-cuda"):
        try:
            return get_backend(name.removesuffix("-cuda"), "cuda")
        except BackendError as exc:
            pytest.skip(str(exc))
    return get_backend(name)


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> Backend:
    return make_backend(request.param)


@pytest.fixture
def mnist_dir() -> Path:
    """The offline MNIST copy beside the repository, or skip."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A directory holding a small synthetic MNIST look-alike (600 train, 200 test images)."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))


@pytest.fixture(scope="session")
def synthetic(synthetic_dir):
    """The synthetic MNIST look-alike of ``synthetic_dir``, loaded as a ``Dataset``."""
    from xpcnn.data.data import load_dataset

    return load_dataset("mnist", synthetic_dir)


@pytest.fixture
def restore_tf32():
    """Put the process-wide TF32 math mode (xpcnn's switch, torch's and JAX's flags) back after the test."""
    torch, jax = sys.modules.get("torch"), sys.modules.get("jax")
    saved_torch = torch and (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    saved_jax = jax and jax.config.jax_default_matmul_precision
    saved = backend_module._tf32
    yield
    backend_module._tf32 = saved
    if saved_torch:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved_torch
    if saved_jax:
        jax.config.update("jax_default_matmul_precision", saved_jax)
