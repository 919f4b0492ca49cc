"""JAX's compiled training and evaluation steps: equal to the same steps run eagerly; resume; compilations."""

import numpy as np
import pytest
from helpers import InterruptAt

from xpcnn import models, nn
from xpcnn.data import device_data
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.training import display, runs, train
from xpcnn.training.config import TrainConfig, make_optimizer

pytest.importorskip("jax")
pytestmark = pytest.mark.slow  # compiling, and the eager runs compared with it

from xpcnn.backends.backend import get_backend  # noqa: E402


def tiny(seed: int = 0) -> nn.Sequential:
    """Every kind of layer (batch norm's buffers and dropout's noise included), small enough to compile quickly."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, rng=rng),  # 28 -> 14
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 7
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 6, 3, rng=rng),  # -> 5
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(6 * 5 * 5, 10, rng=rng, gain=nn.OUTPUT_GAIN),
    )


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(models.MODELS, "tiny", tiny)


@pytest.fixture(scope="module")
def jax_backend():
    return get_backend("jax", "cpu")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, 100), device_data.Normalization.of(images)


def config(**overrides):
    values = dict(model="tiny", epochs=2, batch_size=32, optimizer="adam", lr=3e-3, seed=5, augment=True, elastic=2.0)
    return TrainConfig(**{**values, **overrides})


def fit(backend, data, cfg, dtype, eager):
    """Train a tiny model on the 100 images of ``data`` (batches 32, 32, 32, 4); the trainer and its history."""
    images, labels, norm = data
    xp = backend.xp
    dtype = getattr(xp, dtype)
    with backend.activate():
        split = device_data.DeviceSplit.from_host(backend, images, labels, norm, dtype)
        model = tiny().to(backend, dtype)
        trainer = train.Trainer(model, make_optimizer(cfg, model), backend, cfg, eager=eager)
        state = trainer.fit(split, {"test": split})
    return trainer, state


def relative_difference(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize(
    ("optimizer", "dtype", "tolerance"),
    [("sgd", "float64", 1e-12), ("adam", "float64", 1e-12), ("adam", "float32", 1e-5)],
)
def test_compiled_and_eager_steps_agree(jax_backend, tiny_model, data, optimizer, dtype, tolerance):
    """Dropout, affine and elastic augmentation, batch norm, a short last batch: the same after 4 steps."""
    cfg = config(epochs=1, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    compiled, compiled_state = fit(jax_backend, data, cfg, dtype, eager=False)
    eager, eager_state = fit(jax_backend, data, cfg, dtype, eager=True)
    assert compiled.step_runner.compiles and not eager.step_runner.compiles
    a, b = compiled.model.state_dict(), eager.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert not np.array_equal(a[key], tiny().state_dict()[key]) or "running" in key, key  # it trained
        assert relative_difference(a[key], b[key]) <= tolerance, key
    state_a, state_b = compiled.optimizer.state_dict(), eager.optimizer.state_dict()
    assert state_a["steps"] == state_b["steps"] == 4
    # Moments of raw float32 gradients (sums over thousands of terms, in another order) carry 1e-5 of rounding.
    state_tolerance = max(tolerance, 1e-4 if dtype == "float32" else 0)
    for name, slots in state_b["state"].items():
        assert slots.keys() == state_a["state"][name].keys()
        for slot, value in slots.items():
            assert relative_difference(state_a["state"][name][slot], value) <= state_tolerance, (name, slot)
    for record_a, record_b in zip(compiled_state.history, eager_state.history, strict=True):
        for key in ("train_loss", "test_loss"):
            assert record_a[key] == pytest.approx(record_b[key], rel=tolerance)
        assert record_a["train_accuracy"] == record_b["train_accuracy"]
        assert record_a["compile_seconds"] > 0 and "compile_seconds" not in record_b  # the first epoch compiles


def test_the_noise_of_a_step_depends_on_its_epoch_and_step(jax_backend, tiny_model, data):
    """From the same weights, the same (epoch, step) draws the same dropout and augmentation, another one not."""
    images, labels, norm = data
    cfg = config()
    with jax_backend.activate():
        split = device_data.DeviceSplit.from_host(jax_backend, images, labels, norm)
        model = tiny().to(jax_backend)
        trainer = train.Trainer(model, make_optimizer(cfg, model), jax_backend, cfg)
        batch = jax_backend.asarray(np.arange(32))
        weights, losses = model.state_dict(), []
        for epoch, step in [(0, 0), (0, 0), (0, 1), (1, 0)]:
            model.load_state_dict(weights)
            trainer.step_runner.start_epoch(epoch, step)
            losses.append(float(trainer.step_runner.train_step(split.images, split.labels, batch, step)[0]))
    assert losses[0] == losses[1] and len(set(losses)) == 3, losses


def test_shape_changes_compile_once_each(jax_backend, tiny_model, data):
    """Full batches, the short last one and evaluation batches of two sizes: four programs in three epochs."""
    images, labels, norm = data
    cfg = config(epochs=3)
    with jax_backend.activate():
        split = device_data.DeviceSplit.from_host(jax_backend, images, labels, norm)
        held_out = device_data.DeviceSplit.from_host(jax_backend, images[:30], labels[:30], norm)
        model = tiny().to(jax_backend)
        trainer = train.Trainer(model, make_optimizer(cfg, model), jax_backend, cfg)
        state = trainer.fit(split, {"val": held_out, "test": split})
    assert len(state.history) == 3
    assert trainer.step_runner.compilations == 4
    assert sum(r["compile_seconds"] for r in state.history) == pytest.approx(trainer.step_runner.compile_seconds)


def test_resume_mid_epoch_continues_as_a_straight_run(jax_backend, tiny_model, synthetic_dir, tmp_path):
    """Stopped by Ctrl-C in the middle of epoch 1 and resumed: the same weights as a run that never stopped."""
    dataset = load_dataset("mnist", synthetic_dir)
    cfg = config(batch_size=100, log_every=1)
    runs.train_run(cfg, jax_backend, dataset, tmp_path / "straight")
    with pytest.raises(train.TrainingInterrupted, match="stopped by Ctrl-C at epoch 1, step 3"):
        runs.train_run(cfg, jax_backend, dataset, tmp_path / "stopped", progress=InterruptAt(1, 3))
    runs.train_run(cfg, jax_backend, dataset, tmp_path / "stopped", resume=load_checkpoint(tmp_path / "stopped"))
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "stopped")
    for key, value in straight.model_state.items():
        np.testing.assert_array_equal(resumed.model_state[key], value, err_msg=key)
    for name, slots in straight.optimizer_state["state"].items():
        for slot, value in slots.items():
            np.testing.assert_array_equal(resumed.optimizer_state["state"][name][slot], value)
    for a, b in zip(straight.meta["state"]["history"], resumed.meta["state"]["history"], strict=True):
        assert (a["train_loss"], a["test_loss"], a["test_accuracy"]) == (
            b["train_loss"],
            b["test_loss"],
            b["test_accuracy"],
        )


def test_the_progress_line_shows_compile_time_apart():
    import io

    stream = io.StringIO()
    progress = display.Progress(stream)
    progress.start_epoch(1, 1, 10)
    record = {"train_loss": 0.5, "train_accuracy": 0.9, "seconds": 12.0, "images_per_second": 5000.0}
    progress.end_epoch({**record, "compile_seconds": 3.25})
    progress.end_epoch(record)
    compiled, eager = stream.getvalue().splitlines()
    assert compiled.endswith("12.0 s, 5,000 img/s  (+ 3.2 s compiling)") and "compiling" not in eager


@pytest.mark.parametrize(("flags", "compiled"), [([], True), (["--eager"], False)])
def test_the_eager_flag_reaches_the_trainer(synthetic_dir, tmp_path, monkeypatch, flags, compiled):
    from click.testing import CliRunner

    from xpcnn.apps import cli

    seen = {}

    def fake_train_run(config, backend, dataset, out, **options):
        seen.update(options)
        return train.RunState(history=[{"epoch": 1, "test_accuracy": 0.5, "seconds": 1.0}])

    monkeypatch.setattr(cli, "train_run", fake_train_run)
    args = ["train", "--backend", "jax", "--device", "cpu", "--data-dir", str(synthetic_dir)]
    result = CliRunner().invoke(cli.main, [*args, "--out", str(tmp_path / "run"), *flags])
    assert result.exit_code == 0, result.output
    assert seen["eager"] is not compiled and seen["environment"]["compiled"] is compiled


def test_a_new_program_waits_for_the_work_before_it_before_compiling(jax_backend, monkeypatch):
    """Compiling a short last batch's step overlapped the steps still running before it, and the epoch's seconds,
    which leave the compiling out, left out that running too: epoch 1 showed 60,000+ images/s."""
    import jax

    from xpcnn.training.compiled import _AheadOfTime

    program = _AheadOfTime(lambda x: x * 2, {})
    waits = []
    monkeypatch.setattr(jax, "block_until_ready", lambda leaves: waits.append(program.compilations) or leaves)
    for size in (3, 3, 4, 3):
        program(jax_backend.asarray(np.ones(size, np.float32)))
    assert waits == [0, 1] and program.compilations == 2  # before each compilation, and only then
