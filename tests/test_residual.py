"""A ResNet-style model (residual blocks, global average pooling) through the whole trainer: fit on NumPy and
JAX (compiled and eager), the compiled step against NumPy's, flips and crops in the compiled step, checkpoints."""

import numpy as np
import pytest
from helpers import small_resnet

import xpcnn
from xpcnn import models
from xpcnn.backends.backend import get_backend
from xpcnn.data import device_data
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.training import runs, train
from xpcnn.training.config import TrainConfig, make_optimizer

CLASSES = 4


def blobs(n=192, seed=0):
    """``n`` noisy uint8 copies of four random blob prototypes (28x28) and their labels: an easy problem."""
    rng = np.random.default_rng(seed)
    prototypes = (rng.random((CLASSES, 28, 28)) > 0.7) * 200.0
    labels = rng.integers(0, CLASSES, n)
    images = np.clip(prototypes[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255).astype(np.uint8)
    return images, labels


def resnet(seed=0):
    return small_resnet(seed=seed, channels=4, classes=CLASSES)


class Losses:
    def __init__(self):
        self.values = []

    def on_step(self, step, loss):
        self.values.append(loss)


def assert_the_loss_drops(losses):
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert np.isfinite(losses).all() and last < 0.4 * first, losses


# No flips or crops here: blobs at random places are not mirror images of each other (the tests below train with them).
FIT = dict(epochs=5, batch_size=32, lr=0.1, optimizer="sgd", schedule="onecycle", seed=1)


def test_a_resnet_trains_with_fit_on_numpy_and_its_checkpoint_restores(tmp_path):
    images, labels = blobs()
    model, losses = resnet(), Losses()
    history = xpcnn.fit(model, (images, labels), callbacks=[losses], backend="numpy", **FIT)
    assert_the_loss_drops(losses.values)
    assert history.records[-1]["train_accuracy"] > 0.9
    xpcnn.save(tmp_path / "resnet.npz", model, history)

    checkpoint = load_checkpoint(tmp_path / "resnet.npz")
    assert checkpoint.model_state.keys() == model.state_dict().keys()
    assert "5.projection.1.running_mean" in checkpoint.model_state
    fresh = resnet(seed=9)
    optimizer = make_optimizer(TrainConfig(**{k: v for k, v in FIT.items() if k != "epochs"}), fresh)
    runs.restore(checkpoint, fresh, optimizer)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[name], value, err_msg=name)
    assert optimizer.state_dict()["steps"] == history.optimizer.state_dict()["steps"]
    a = xpcnn.evaluate(model, images, labels, normalization=history.normalization)
    b = xpcnn.evaluate(fresh, images, labels, normalization=history.normalization)
    assert a.loss == b.loss and np.array_equal(a.predictions, b.predictions)


@pytest.mark.slow
def test_a_resnet_trains_with_fit_on_jax_compiled():
    pytest.importorskip("jax")
    images, labels = blobs()
    model, losses = resnet(), Losses()
    xpcnn.fit(model, (images, labels), callbacks=[losses], backend="jax", **FIT)
    assert_the_loss_drops(losses.values)


@pytest.mark.slow
def test_a_resnet_trains_on_jax_eager():
    """fit has no eager switch: the trainer fit builds, with ``eager=True``."""
    pytest.importorskip("jax")
    backend = get_backend("jax", "cpu")
    images, labels = blobs()
    norm = device_data.Normalization.of(images)
    config = TrainConfig(model="seed", **FIT)
    model, losses = resnet().to(backend), Losses()
    with backend.activate():
        split = device_data.DeviceSplit.from_host(backend, images, labels, norm)
        trainer = train.Trainer(model, make_optimizer(config, model), backend, config, callbacks=[losses], eager=True)
        trainer.fit(split, {})
    assert not trainer.step_runner.compiles
    assert_the_loss_drops(losses.values)


def train_steps(backend, config, dtype, eager=False, n=100):
    """One epoch of ``n`` images in batches of 32 (100: 4 steps, a short last one) from the same initial model."""
    images, labels = blobs(n, seed=2)
    norm = device_data.Normalization.of(images)
    with backend.activate():
        split = device_data.DeviceSplit.from_host(backend, images, labels, norm, getattr(backend.xp, dtype))
        model = resnet(seed=5).to(backend, getattr(backend.xp, dtype))
        trainer = train.Trainer(model, make_optimizer(config, model), backend, config, eager=eager)
        trainer.fit(split, {})
    return trainer


def relative_difference(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_same_training(a, b, tolerance):
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    initial = resnet(seed=5).state_dict()
    for name, value in state_a.items():
        assert not np.array_equal(value, initial[name]), name  # every parameter and buffer moved
        assert relative_difference(value, state_b[name]) <= tolerance, name
    slots_a, slots_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert slots_a["steps"] == slots_b["steps"]
    for name, slots in slots_b["state"].items():
        for slot, value in slots.items():
            assert relative_difference(slots_a["state"][name][slot], value) <= tolerance, (name, slot)


@pytest.mark.slow
def test_the_compiled_jax_step_equals_numpys_on_a_resnet():
    """float64, SGD with momentum and weight decay, batch norm in both paths: four steps agree to rounding."""
    pytest.importorskip("jax")
    config = TrainConfig(model="seed", epochs=1, batch_size=32, optimizer="sgd", lr=0.1, seed=3)
    compiled = train_steps(get_backend("jax", "cpu"), config, "float64")
    assert compiled.step_runner.compiles and compiled.optimizer.steps == 4
    assert_same_training(compiled, train_steps(get_backend("numpy"), config, "float64"), 1e-10)


@pytest.mark.slow
def test_flips_crops_and_erasing_in_the_compiled_jax_step_equal_the_eager_step():
    """The same keys draw the same warps, flips, crops and rectangles inside the compiled step as eagerly; and
    they change what is learnt."""
    pytest.importorskip("jax")
    jax_backend = get_backend("jax", "cpu")
    values = dict(model="seed", epochs=1, batch_size=32, optimizer="adam", lr=3e-3, seed=3, augment=True)
    config = TrainConfig(**values, flip=True, crop=3, erase=0.5)
    compiled = train_steps(jax_backend, config, "float64", n=64)
    assert compiled.optimizer.steps == 2
    assert_same_training(compiled, train_steps(jax_backend, config, "float64", eager=True, n=64), 1e-12)
    warped_only = train_steps(jax_backend, TrainConfig(**values), "float64", n=64)
    difference = relative_difference(
        compiled.model.state_dict()["0.weight"], warped_only.model.state_dict()["0.weight"]
    )
    assert difference > 1e-6


@pytest.mark.slow
def test_a_resnet_run_resumed_after_an_epoch_equals_a_straight_run(synthetic, tmp_path, monkeypatch):
    """Through run directories (a named model, rebuilt from the checkpoint's configuration): bit for bit."""
    monkeypatch.setitem(models.MODELS, "resnet-test", lambda seed=0: small_resnet(seed=seed, channels=4))
    numpy = get_backend("numpy")
    values = dict(model="resnet-test", batch_size=100, lr=0.05, schedule="constant", seed=2, flip=True, crop=2)
    runs.train_run(TrainConfig(epochs=2, **values), numpy, synthetic, tmp_path / "straight")
    runs.train_run(TrainConfig(epochs=1, **values), numpy, synthetic, tmp_path / "resumed")
    resume = load_checkpoint(tmp_path / "resumed")
    runs.train_run(TrainConfig(epochs=2, **values), numpy, synthetic, tmp_path / "resumed", resume=resume)
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert straight.model_state.keys() == resumed.model_state.keys()
    for name, value in straight.model_state.items():
        np.testing.assert_array_equal(resumed.model_state[name], value, err_msg=name)
    model, _ = runs.model_from_checkpoint(resumed, numpy)
    assert "5.branch.0.weight" in model.state_dict()
