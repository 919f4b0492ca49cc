"""Shared fixtures: one backend fixture that every backend-agnostic test runs on."""

from pathlib import Path

import pytest

from xpcnn.backend import Backend, cuda_problem, get_backend

BACKEND_PARAMS = ["numpy", "array-api-strict", "cupy"]

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


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
