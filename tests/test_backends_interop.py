"""Checkpoints move between backends: trained on any one, loaded (and resumed) on every other."""

import numpy as np
import pytest
from conftest import make_backend
from helpers import write_synthetic_mnist

from xpcnn import models
from xpcnn.backends.backend import to_host
from xpcnn.data import device_data
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.training import runs
from xpcnn.training.config import TrainConfig

CPU_BACKENDS = ["numpy", "array-api-strict", "torch", "jax"]
PAIRS = [
    pytest.param(writer, reader, marks=[pytest.mark.slow] if "jax" in (writer, reader) else [])
    for writer in CPU_BACKENDS
    for reader in CPU_BACKENDS
    if writer != reader
]


def config(epochs=1):
    return TrainConfig(model="convnet", epochs=epochs, batch_size=32, optimizer="adam", lr=2e-3, seed=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny synthetic MNIST look-alike: two training steps of 32 images per epoch."""
    return load_dataset("mnist", write_synthetic_mnist(tmp_path_factory.mktemp("tiny"), n_train=64, n_test=40))


@pytest.fixture(scope="module")
def run_on(dataset, tmp_path_factory):
    """``run_on(name)``: the run directory of one epoch trained on backend ``name`` (trained once)."""
    trained = {}

    def run(name):
        if name not in trained:
            out = tmp_path_factory.mktemp("runs") / name
            runs.train_run(config(), make_backend(name), dataset, out)
            trained[name] = out
        return trained[name]

    return run


def logits(checkpoint, backend, dataset):
    """Host float64 logits of the checkpoint's model on ``backend`` for the first test images."""
    model, norm = runs.model_from_checkpoint(checkpoint, backend)
    images = device_data.normalize_images(backend, dataset.test_images[:, None] / 255.0, norm)
    with backend.activate():
        return to_host(model.eval().forward(images)).astype(np.float64), model


@pytest.mark.parametrize("writer, reader", PAIRS)
def test_checkpoint_loads_and_resumes_on_another_backend(writer, reader, run_on, dataset, tmp_path):
    reading = make_backend(reader)
    checkpoint = load_checkpoint(run_on(writer))
    initial = models.build("convnet", seed=5).state_dict()
    assert not np.array_equal(checkpoint.model_state["0.weight"], initial["0.weight"])  # it trained

    expected, _ = logits(checkpoint, make_backend(writer), dataset)
    got, model = logits(checkpoint, reading, dataset)
    for key, value in model.state_dict().items():
        assert np.array_equal(value, checkpoint.model_state[key]), key
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    state = runs.train_run(config(epochs=2), reading, dataset, tmp_path / "resumed", resume=checkpoint)
    assert [record["epoch"] for record in state.history] == [1, 2]
    assert np.isfinite(state.history[-1]["train_loss"])
