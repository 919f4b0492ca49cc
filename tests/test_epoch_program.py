"""JAX's epoch program: chunks of steps as one compiled program, equal to the compiled steps run one by one."""

import json
import math

import numpy as np
import pytest
from helpers import InterruptAt
from test_compiled import relative_difference, tiny

from xpcnn import models
from xpcnn.data import device_data
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.training import runs, train
from xpcnn.training.config import TrainConfig, make_optimizer

pytest.importorskip("jax")
pytestmark = pytest.mark.slow  # compiling

from xpcnn.backends.backend import get_backend  # noqa: E402


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(models.MODELS, "tiny", tiny)


@pytest.fixture(scope="module")
def jax_backend():
    return get_backend("jax", "cpu")


@pytest.fixture(scope="module")
def data():
    """100 images: batches of 16 make 6 full steps and a short one of 4 per epoch."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, 100), device_data.Normalization.of(images)


def config(**overrides):
    values = dict(
        model="tiny", epochs=2, batch_size=16, optimizer="adam", lr=3e-3, seed=5, log_every=4,
        augment=True, elastic=2.0, label_smoothing=0.1,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def fit(backend, data, cfg, dtype="float32", epoch_program=True):
    """The trainer and its state after fitting the tiny model (dropout, batch norm) on ``data``."""
    images, labels, norm = data
    dtype = getattr(backend.xp, dtype)
    with backend.activate():
        split = device_data.DeviceSplit.from_host(backend, images, labels, norm, dtype)
        model = tiny().to(backend, dtype)
        trainer = train.Trainer(model, make_optimizer(cfg, model), backend, cfg, epoch_program=epoch_program)
        state = trainer.fit(split, {"test": split})
    return trainer, state


def assert_same_training(a: train.Trainer, b: train.Trainer, state_a, state_b, tolerance: float):
    """Parameters, batch-norm statistics, optimiser state and history agree to ``tolerance`` (relative)."""
    weights_a, weights_b = a.model.state_dict(), b.model.state_dict()
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert relative_difference(weights_a[key], weights_b[key]) <= tolerance, key
    optimizer_a, optimizer_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert (optimizer_a["steps"], optimizer_a["lr"]) == (optimizer_b["steps"], optimizer_b["lr"])
    for name, slots in optimizer_b["state"].items():
        for slot, value in slots.items():
            assert relative_difference(optimizer_a["state"][name][slot], value) <= tolerance, (name, slot)
    assert len(state_a.history) == len(state_b.history)
    for record_a, record_b in zip(state_a.history, state_b.history, strict=True):
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "lr"):
            assert record_a[key] == pytest.approx(record_b[key], rel=tolerance), key
    assert (state_a.epoch, state_a.step, state_a.global_step) == (state_b.epoch, state_b.step, state_b.global_step)


@pytest.mark.parametrize(
    ("optimizer", "schedule", "dtype", "tolerance"),
    [
        ("sgd", "step", "float64", 1e-12),
        ("adam", "cosine", "float64", 1e-12),
        ("adamw", "onecycle", "float64", 1e-12),
        ("sgd", "constant", "float32", 1e-5),
        ("adamw", "onecycle", "float32", 1e-5),
    ],
)
def test_the_epoch_program_trains_as_the_compiled_steps_one_by_one(
    jax_backend, tiny_model, data, optimizer, schedule, dtype, tolerance
):
    """Dropout, affine and elastic augmentation, label smoothing, batch norm, a short last batch, two epochs."""
    lr = 0.05 if optimizer == "sgd" else 3e-3
    extra = {"momentum": 0.9, "weight_decay": 5e-4} if optimizer == "sgd" else {}
    cfg = config(optimizer=optimizer, schedule=schedule, lr=lr, **extra)
    programs, programs_state = fit(jax_backend, data, cfg, dtype)
    steps, steps_state = fit(jax_backend, data, cfg, dtype, epoch_program=False)
    assert programs.epoch_programs and not steps.epoch_programs
    assert programs.optimizer.steps == 14
    assert_same_training(programs, steps, programs_state, steps_state, tolerance)
    initial = tiny().state_dict()
    assert all(not np.array_equal(value, initial[key]) for key, value in programs.model.state_dict().items())


def test_the_epoch_program_keeps_the_moving_average_as_the_steps_one_by_one(jax_backend, tiny_model, data):
    """The average is one more slot of the state the program carries; the model ends holding it."""
    cfg = config(optimizer="sgd", schedule="onecycle", lr=0.05, momentum=0.9, weight_decay=5e-4, ema=0.8)
    programs, programs_state = fit(jax_backend, data, cfg, "float64")
    steps, steps_state = fit(jax_backend, data, cfg, "float64", epoch_program=False)
    assert programs.epoch_programs and not steps.epoch_programs
    assert all(set(slots) == {"momentum", "ema"} for slots in programs.optimizer.state_dict()["state"].values())
    assert_same_training(programs, steps, programs_state, steps_state, 1e-12)
    averaged = programs.optimizer.averaged_parameters()
    assert all(np.array_equal(np.asarray(value), np.asarray(averaged[name])) for name, value in
               programs.model.named_parameters())  # fmt: skip


def test_an_epoch_is_a_few_dispatches_and_compiles_once_for_the_whole_run(jax_backend, tiny_model, data, monkeypatch):
    """Three epochs of 6 full steps (chunks of 4 and 2) and a short one: 2 training programs, 1 evaluation."""
    calls = {"train_steps": [], "train_step": 0}
    from xpcnn.training.compiled import CompiledSteps

    chunk, single = CompiledSteps.train_steps, CompiledSteps.train_step

    def counted_chunk(self, images, labels, order, lrs, first, end, *rest):
        calls["train_steps"].append((first, end))
        return chunk(self, images, labels, order, lrs, first, end, *rest)

    def counted_step(self, *args):
        calls["train_step"] += 1
        return single(self, *args)

    monkeypatch.setattr(CompiledSteps, "train_steps", counted_chunk)
    monkeypatch.setattr(CompiledSteps, "train_step", counted_step)
    starts = []
    start_epoch = CompiledSteps.start_epoch

    def noted_start(self, epoch, step):
        starts.append(self.compile_seconds)  # what set-up compiled, before any epoch
        return start_epoch(self, epoch, step)

    monkeypatch.setattr(CompiledSteps, "start_epoch", noted_start)
    trainer, state = fit(jax_backend, data, config(epochs=3))
    assert calls["train_steps"] == [(0, 4), (4, 6)] * 3 and calls["train_step"] == 3
    assert trainer.step_runner.compilations == 3  # the epoch program, the short last step, the evaluation batch
    assert sum(r["compile_seconds"] for r in state.history) == pytest.approx(
        trainer.step_runner.compile_seconds - starts[0]
    )
    assert state.history[1]["compile_seconds"] == state.history[2]["compile_seconds"] == 0


def test_compile_seconds_count_the_programs_that_eager_calls_compile(jax_backend, tiny_model):
    """JAX compiles a one-operation program the first time an eager call meets a new shape: that is compiling
    too, and the trainer counts it apart from the training seconds (it was ~0.7 s of a first epoch)."""
    import jax.numpy as jnp

    from xpcnn.nn import CrossEntropyLoss
    from xpcnn.training.compiled import CompiledSteps

    model = tiny().to(jax_backend)
    steps = CompiledSteps(model, CrossEntropyLoss(), make_optimizer(config(), model), jax_backend, seed=0)
    before = steps.compile_seconds
    with jax_backend.activate():
        jnp.ones((3, 17, 5)) * 2.5  # a shape nothing else here uses
    assert steps.compile_seconds > before
    assert CompiledSteps(model, CrossEntropyLoss(), steps.optimizer, jax_backend, seed=0).compile_seconds == 0


def test_step_callbacks_run_step_by_step(jax_backend, tiny_model, data):
    """A callback that reads every step's loss gets it: those runs take the step programs."""
    losses = []

    class Record:
        def on_step(self, step, loss):
            losses.append((step, loss))

    images, labels, norm = data
    cfg = config(epochs=1)
    with jax_backend.activate():
        split = device_data.DeviceSplit.from_host(jax_backend, images, labels, norm)
        model = tiny().to(jax_backend)
        trainer = train.Trainer(model, make_optimizer(cfg, model), jax_backend, cfg, callbacks=[Record()])
        trainer.fit(split, {})
    assert [step for step, _ in losses] == list(range(1, 8)) and all(math.isfinite(loss) for _, loss in losses)


def arrays(run) -> dict:
    checkpoint = load_checkpoint(run)
    slots = {
        f"{name}.{slot}": value for name, s in checkpoint.optimizer_state["state"].items() for slot, value in s.items()
    }
    return {**checkpoint.model_state, **slots}, checkpoint.meta["state"]["history"]


@pytest.mark.parametrize(
    ("stop_at", "resume_log_every", "resume_programs"),
    [
        (4, 3, True),  # stopped at a chunk's end, resumed with chunks of 3: they start mid-chunk of the first run
        (4, 4, False),  # resumed step by step
        (8, 4, True),  # one full step and the short one left in the epoch
    ],
)
def test_a_stopped_epoch_program_resumes_as_a_straight_run(
    jax_backend, tiny_model, synthetic, tmp_path, stop_at, resume_log_every, resume_programs
):
    """Ctrl-C in the middle of epoch 1 (600 images, batches of 64: 9 full steps and a short one) and resumed."""
    cfg = config(batch_size=64, log_every=2)
    runs.train_run(cfg, jax_backend, synthetic, tmp_path / "straight")
    stopped = tmp_path / "stopped"
    with pytest.raises(train.TrainingInterrupted, match=f"stopped by Ctrl-C at epoch 1, step {stop_at}"):
        runs.train_run(cfg, jax_backend, synthetic, stopped, progress=InterruptAt(1, stop_at))
    assert load_checkpoint(stopped).meta["state"]["step"] == stop_at
    resumed_cfg = config(batch_size=64, log_every=resume_log_every)
    runs.train_run(
        resumed_cfg, jax_backend, synthetic, stopped, resume=load_checkpoint(stopped), epoch_program=resume_programs
    )
    (straight, straight_history), (resumed, resumed_history) = arrays(tmp_path / "straight"), arrays(stopped)
    for key, value in straight.items():
        assert relative_difference(resumed[key], value) <= 1e-5, key
    for a, b in zip(straight_history, resumed_history, strict=True):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_a_nan_inside_a_chunk_is_caught_at_its_end_and_the_last_good_checkpoint_kept(
    jax_backend, tiny_model, synthetic, tmp_path, monkeypatch
):
    steps_per_epoch = math.ceil(600 / 64)

    def poisoned(schedule, base_lr, step, total_steps):
        return math.nan if step >= steps_per_epoch + 1 else base_lr  # epoch 2, step 2 (of the chunk 1-4)

    monkeypatch.setattr(train, "scheduled_lr", poisoned)
    run = tmp_path / "run"
    with pytest.raises(train.TrainingDiverged, match=r"loss became nan at epoch 2, step 4; the last good checkpoint"):
        runs.train_run(config(batch_size=64, log_every=4), jax_backend, synthetic, run)
    checkpoint = load_checkpoint(run)
    assert checkpoint.meta["state"]["epoch"] == 1
    assert all(np.isfinite(v).all() for v in checkpoint.model_state.values())
    assert len(json.loads((run / "history.json").read_text())) == 1
