"""Backend selection, host <-> device moves and the random generator adapters."""

import numpy as np
import pytest

from xpcnn import backend as B


def test_cpu_names_select_numpy():
    for spec in ("numpy", "cpu"):
        chosen = B.get_backend(spec)
        assert (chosen.name, chosen.device_name) == ("numpy", "cpu")
    assert B.get_backend(None, "cpu").name == "numpy"


def test_auto_picks_cuda_only_when_it_works():
    chosen = B.get_backend("auto")
    assert chosen.name == ("numpy" if B.cuda_problem() else "cupy")


def test_strict_backend():
    pytest.importorskip("array_api_strict")
    chosen = B.get_backend("array-api-strict")
    x = chosen.asarray(np.arange(3.0), chosen.xp.float32)
    assert type(x).__module__.startswith("array_api_strict")
    assert B.to_host(x).dtype == np.float32


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cupy"])
def test_cuda_request_without_cuda_says_what_is_missing(spec):
    problem = B.cuda_problem()
    if problem is None:
        pytest.skip("CUDA works here")
    with pytest.raises(B.BackendError, match="cannot use cuda:0: " + problem.split(" (")[0]):
        B.get_backend(spec)


def test_cuda_problem_names_the_missing_package(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def no_cupy(name, *args):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args)

    monkeypatch.setattr(B.importlib, "import_module", no_cupy)
    assert B.cuda_problem().startswith("CuPy is not installed")


@pytest.mark.parametrize(
    "backend, device, message",
    [
        ("tensorflow", None, "unknown backend 'tensorflow'"),
        (None, "gpu", "unknown device 'gpu'"),
        ("numpy", "cuda", "numpy backend runs on the CPU only"),
        ("cpu", "cuda", "conflicting devices"),
        (None, "cuda:x", "unknown device 'cuda:x'"),
    ],
)
def test_bad_requests(backend, device, message):
    if device == "gpu":
        with pytest.raises(B.BackendError, match=message):
            B.get_backend(None, device)
        return
    if device and device.startswith("cuda:x") and B.cuda_problem() is None:
        pytest.skip("CUDA works here")
    with pytest.raises(B.BackendError, match=message):
        B.get_backend(backend, device)


def test_round_trip_keeps_values(backend):
    host = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    moved = backend.asarray(host)
    assert np.array_equal(backend.to_host(moved), host)
    assert backend.to_host(backend.asarray(host, backend.xp.float64)).dtype == np.float64


def test_generator_is_reproducible_and_seed_sensitive(backend):
    def draw(*seed):
        gen = backend.generator(*seed)
        return [
            B.to_host(a)
            for a in (gen.random((5,), backend.xp.float32), gen.normal((5,), backend.xp.float32), gen.permutation(7))
        ]

    first, again, other = draw(1, 2), draw(1, 2), draw(1, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=False))
    assert not np.array_equal(first[0], other[0])
    uniform, normal, permutation = first
    assert uniform.dtype == np.float32 and ((0 <= uniform) & (uniform < 1)).all()
    assert normal.dtype == np.float32
    assert sorted(permutation.tolist()) == list(range(7))


def test_backend_of_finds_the_array_backend(backend):
    x = backend.asarray(np.zeros(2))
    found = B.backend_of(x)
    assert found.name == backend.name
    y = found.asarray(np.ones(2))
    backend.xp.add(x, y)  # same namespace and device: mixing them does not raise


def test_available_backends_lists_each_with_a_status():
    rows = {row["backend"]: row for row in B.available_backends()}
    assert rows["numpy"]["status"] == "ok" and rows["numpy"]["version"] == np.__version__
    assert set(rows) >= {"numpy", "array-api-strict", "cupy"}
