"""Backend selection, host <-> device moves and the random generator adapters."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from xpcnn import models, nn, optim
from xpcnn.backends import backend as B
from xpcnn.backends import diagnostics


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


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_torch_and_jax_on_the_cpu(name):
    pytest.importorskip(name)
    chosen = B.get_backend(name, "cpu")
    assert (chosen.name, chosen.device_name, chosen.is_gpu) == (name, "cpu", False)
    x = chosen.asarray(np.arange(3.0))
    assert B.to_host(x).dtype == np.float64  # JAX keeps float64 (x64 mode), no silent float32
    assert B.backend_of(x).describe() == f"{name} on cpu"


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_auto_device_is_the_cpu_without_a_gpu(name):
    pytest.importorskip(name)
    chosen = B.get_backend(name, "auto")
    if chosen.is_gpu:
        pytest.skip(f"{name} uses {chosen.device_name} here")
    assert chosen.device_name == "cpu"
    with pytest.raises(B.BackendError, match=f"cannot use cuda:0 with {name}: "):
        B.get_backend(name, "cuda")


@pytest.mark.parametrize("name, hint", [("torch", r"pip install torch==2\.13\.0"), ("jax", "pip install jax")])
def test_missing_package_says_how_to_install_it(monkeypatch, name, hint):
    real_import = importlib.import_module

    def without(module, *args):
        if module == name:
            raise ImportError(f"No module named '{name}'")
        return real_import(module, *args)

    monkeypatch.setattr(B.importlib, "import_module", without)
    with pytest.raises(B.BackendError, match=f"the {name} backend needs the Python package '{name}'.*{hint}") as err:
        B.get_backend(name, "cpu")
    assert "\n" not in str(err.value)


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
        (None, "cuda:\u00b2", "unknown device 'cuda:\u00b2'"),  # a digit to str.isdigit, not to int()
        ("numpy", "gpu", "unknown device 'gpu'"),  # every backend, not only those that look at the name
        ("array-api-strict", "mps", "unknown device 'mps'"),
        ("numpy", "", "unknown device ''"),
    ],
)
def test_bad_requests(backend, device, message):
    if device and device.startswith("cuda:x") and B.cuda_problem() is None:
        pytest.skip("CUDA works here")
    with pytest.raises(B.BackendError, match=message):
        B.get_backend(backend, device)


def test_round_trip_keeps_values(backend):
    host = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    moved = backend.asarray(host)
    assert np.array_equal(backend.to_host(moved), host)
    assert backend.to_host(backend.asarray(host, backend.xp.float64)).dtype == np.float64


def test_host_arrays_of_any_layout_move(backend):
    """Read-only and negatively strided host arrays (torch refuses to wrap those) move as values."""
    host = np.arange(12.0).reshape(3, 4)
    host.flags.writeable = False
    for view in (host, host[::-1, ::-2], host.T):
        assert np.array_equal(backend.to_host(backend.asarray(view)), view)


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
    rows = {row["backend"]: row for row in diagnostics.available_backends()}
    assert rows["numpy"]["status"] == "ok" and rows["numpy"]["version"] == np.__version__
    assert list(rows) == list(B.BACKEND_NAMES)
    for name in ("torch", "jax"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            assert rows[name]["status"] == "not installed"
            continue
        assert rows[name]["version"] == module.__version__
        assert rows[name]["status"].startswith("ok: cpu")


def test_float32_training_step_stays_float32(backend):
    """No float64 creeps into float32 training on any backend (JAX runs in x64 mode)."""
    model = models.build("convnet", seed=0).to(backend)
    model.set_generator(backend.generator(0))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model, lr=0.1, momentum=0.9)
    x = backend.asarray(np.random.default_rng(0).random((4, 1, 28, 28), np.float32))
    y = backend.asarray(np.array([0, 1, 2, 3]))
    for _ in range(2):
        optimizer.zero_grad()
        logits = model.forward(x)
        loss = loss_fn.forward(logits, y)
        model.backward(loss_fn.backward(), input_grad=False)
        optimizer.step()
    arrays = {"logits": logits, "loss": loss, **dict(model.named_parameters()), **dict(model.named_gradients())}
    arrays.update({f"{name}/{slot}": v for name, slots in optimizer.state.items() for slot, v in slots.items()})
    assert {name: B.to_host(a).dtype for name, a in arrays.items() if B.to_host(a).dtype != np.float32} == {}


# --- TF32 math mode ---


def test_tf32_switches_torch_and_jax_together(restore_tf32):
    torch, jax = pytest.importorskip("torch"), pytest.importorskip("jax")
    B.get_backend("jax", "cpu")
    assert jax.config.jax_default_matmul_precision == "highest"  # never TF32 unless asked for
    B.set_tf32(True)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    assert jax.config.jax_default_matmul_precision == "tensorfloat32"
    B.get_backend("jax", "cpu")  # creating a backend keeps the mode
    assert jax.config.jax_default_matmul_precision == "tensorfloat32"
    B.set_tf32(False)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    assert jax.config.jax_default_matmul_precision == "highest"


@pytest.mark.parametrize("name", ["numpy", "torch", "jax"])
def test_tf32_changes_nothing_on_the_cpu(restore_tf32, name):
    if name != "numpy":
        pytest.importorskip(name)
    cpu = B.get_backend(name, "cpu")
    model = models.build("convnet", seed=1).to(cpu).eval()
    x = cpu.asarray(np.random.default_rng(0).normal(size=(8, 1, 28, 28)), cpu.xp.float32)
    B.set_tf32(False)
    exact = B.to_host(model.forward(x))
    B.set_tf32(True)
    np.testing.assert_array_equal(B.to_host(model.forward(x)), exact)


def test_tf32_rounds_float32_matmuls_on_a_gpu(restore_tf32):
    """On an NVIDIA GPU (Ampere or newer) TF32 keeps 10 mantissa bits: ~1e-3 relative error instead of ~1e-6."""
    problem = B.cuda_problem()
    if problem is not None:
        pytest.skip(problem)
    import cupy

    if int(cupy.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 needs compute capability 8.0 or newer")
    gpu = B.get_backend("cupy")
    host = np.random.default_rng(0).uniform(1, 2, size=(256, 256))
    exact = host @ host
    a = gpu.asarray(host, cupy.float32)

    def error():
        return np.max(np.abs(B.to_host(a @ a) - exact) / exact)

    B.set_tf32(False)
    assert error() < 1e-5
    B.set_tf32(True)
    assert error() > 1e-4


def test_to_host_copies_where_arrays_are_updated_in_place(backend):
    """A host snapshot (a state_dict) must not follow an optimiser's in-place update."""
    array = backend.asarray(np.zeros(3, np.float32))
    if not optim.updates_in_place(array):
        pytest.skip(f"{backend.name} arrays are not updated in place")
    host = B.to_host(array)
    array += 2.0
    assert np.array_equal(host, np.zeros(3, np.float32))


def test_namespace_lookup_by_type_agrees_with_array_api_compat(backend):
    import array_api_compat

    from xpcnn.backends.backend import namespace

    a, b = backend.asarray(np.zeros(3)), backend.asarray(np.ones(2))
    assert namespace(a) is array_api_compat.array_namespace(a)
    assert namespace(a, b) is namespace(b) is array_api_compat.array_namespace(a, b)


def test_namespace_of_mixed_libraries_is_an_error():
    torch = pytest.importorskip("torch")
    from xpcnn.backends.backend import namespace

    with pytest.raises(TypeError):
        namespace(np.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("platforms", ["cuda", "bogus"])
def test_jax_platforms_that_leave_out_the_cpu_are_one_line(platforms, synthetic_dir, tmp_path):
    """JAX_PLATFORMS naming a platform this jaxlib lacks (a bare AssertionError inside JAX) or an unknown one
    (RuntimeError): one line and exit 1, not a bug report."""
    pytest.importorskip("jax")
    command = [sys.executable, "-m", "xpcnn", "train", "--backend", "jax", "--data-dir", str(synthetic_dir)]
    environment = {**os.environ, "JAX_PLATFORMS": platforms}
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "run")], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot use the CPU with jax: JAX_PLATFORMS='{platforms}' leaves it out"
    ]
