"""xpcnn.fit / evaluate / save: one call each, on arrays or a dataset name, with callbacks."""

import numpy as np
import pytest

import xpcnn
from xpcnn import models
from xpcnn.base.errors import XpcnnError
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.training.config import TrainConfig
from xpcnn.training.runs import model_from_checkpoint, train_run


def blobs(n=240, seed=0):
    """``n`` noisy uint8 copies of 10 random 28x28 blob prototypes, and their labels."""
    rng = np.random.default_rng(seed)
    prototypes = (np.random.default_rng(99).random((10, 28, 28)) > 0.7) * 200.0
    labels = rng.integers(0, 10, n)
    return np.clip(prototypes[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255).astype(np.uint8), labels


class Recorder:
    def __init__(self, stop_at_step=None):
        self.steps, self.records, self.stop_at_step = [], [], stop_at_step

    def on_step(self, step, loss):
        self.steps.append((step, loss))
        return step == self.stop_at_step

    def on_epoch_end(self, record):
        self.records.append(record)


def test_fit_on_arrays_calls_back_every_step_and_epoch_and_evaluate_agrees(backend):
    images, labels = blobs()
    val_images, val_labels = blobs(60, seed=1)
    recorder = Recorder()
    model = models.build("seed", seed=0)
    validation = (val_images, val_labels)
    history = xpcnn.fit(
        model,
        (images, labels),
        validation=validation,
        epochs=2,
        batch_size=32,
        lr=0.01,
        callbacks=[recorder],
        backend=backend,
    )
    assert [record["epoch"] for record in history.records] == [1, 2]
    assert recorder.records == history.records
    assert [step for step, _ in recorder.steps] == list(range(1, 2 * 8 + 1))  # ceil(240 / 32) = 8 steps an epoch
    assert all(isinstance(loss, float) and np.isfinite(loss) for _, loss in recorder.steps)
    assert history.records[-1]["val_accuracy"] > 0.5  # ten easy classes: far above chance
    result = xpcnn.evaluate(model, val_images[:, None], val_labels, normalization=history.normalization)
    assert result.accuracy == pytest.approx(history.records[-1]["val_accuracy"])
    assert result.loss == pytest.approx(history.records[-1]["val_loss"], rel=1e-5)


def test_a_callback_stops_training_after_its_step():
    images, labels = blobs()
    recorder = Recorder(stop_at_step=3)
    history = xpcnn.fit("seed", (images / 255.0, labels), epochs=3, batch_size=32, callbacks=[recorder])
    assert [step for step, _ in recorder.steps] == [1, 2, 3]
    assert len(history.records) == 1 and history.state.global_step == 3


def test_fit_on_a_dataset_name_matches_xpcnn_train(synthetic_dir, tmp_path):
    """The same settings give the same numbers as the command line's run."""
    settings = {"epochs": 1, "batch_size": 50, "lr": 0.02}
    history = xpcnn.fit("convnet", "mnist", data_dir=synthetic_dir, validation=100, **settings)
    config = TrainConfig(model="convnet", validation=100, **settings)
    state = train_run(config, xpcnn.get_backend("numpy"), load_dataset("mnist", synthetic_dir), tmp_path / "run")
    drop = ("seconds", "images_per_second", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in history.records] == [
        {k: v for k, v in r.items() if k not in drop} for r in state.history
    ]


def test_save_writes_a_checkpoint_the_loaders_read(tmp_path):
    images, labels = blobs()
    model = models.build("seed", seed=0)
    history = xpcnn.fit(model, (images, labels), batch_size=32)
    xpcnn.save(tmp_path / "seed.npz", model, history)
    checkpoint = load_checkpoint(tmp_path / "seed.npz")
    loaded, normalization = model_from_checkpoint(checkpoint, xpcnn.get_backend("numpy"))
    assert normalization == history.normalization
    before = xpcnn.evaluate(model, images, labels, normalization=history.normalization)
    after = xpcnn.evaluate(loaded, images, labels, normalization=normalization)
    assert np.array_equal(before.predictions, after.predictions)
    assert checkpoint.optimizer_state["steps"] == history.optimizer.steps == 8


IMAGES, LABELS = blobs(20)


@pytest.mark.parametrize(
    "data, message",
    [
        ("cifar", "unknown dataset 'cifar'"),
        ((IMAGES,), "a dataset name .* or a pair"),
        ((IMAGES[:, :5], LABELS), "does not take images of shape"),
        ((IMAGES[:, None, None], LABELS), r"shape \(N, H, W\) or \(N, 1, H, W\)"),
        ((IMAGES.astype(np.int32), LABELS), "uint8 .* or floats .*, got dtype int32"),
        ((IMAGES / 100.0, LABELS), r"float images must lie in \[0, 1\]"),
        ((IMAGES, LABELS[:5]), "labels must be 20 integers"),
        ((IMAGES, LABELS * 1.0), "labels must be 20 integers"),
        ((IMAGES, LABELS + 1), r"labels must lie in \[0, 9\]"),
        ((np.full_like(IMAGES, 255), LABELS), r"every pixel of the training images is 1 \(in \[0, 1\]\)"),
        ((np.full(IMAGES.shape, 0.25), LABELS), r"every pixel of the training images is 0.25"),
    ],
)
def test_bad_data_is_one_clear_error(data, message):
    with pytest.raises(XpcnnError, match=message) as info:
        xpcnn.fit("seed", data)
    assert "\n" not in str(info.value)


def test_images_the_model_does_not_take_are_refused_before_training_wherever_they_are_given():
    padded = np.pad(IMAGES[:5], ((0, 0), (2, 2), (2, 2)))  # 32x32
    steps = []

    class Count:
        def on_step(self, step, loss):
            steps.append(step)

    with pytest.raises(XpcnnError, match=r"^the val images: the model does not take images of shape \(32, 32\)"):
        xpcnn.fit("seed", (IMAGES, LABELS), validation=(padded, LABELS[:5]), callbacks=[Count()])
    assert steps == []  # refused before the first step, not after the first epoch
    history = xpcnn.fit("seed", (IMAGES, LABELS), epochs=1)
    with pytest.raises(XpcnnError, match=r"^evaluate's data: the model does not take images of shape \(32, 32\)"):
        xpcnn.evaluate(history.optimizer.model, padded, LABELS[:5], normalization=history.normalization)


def test_bad_settings_are_config_errors():
    with pytest.raises(XpcnnError, match="neither an on_step nor an on_epoch_end method"):
        xpcnn.fit("seed", (IMAGES, LABELS), callbacks=[print])
    with pytest.raises(XpcnnError, match="unknown configuration keys"):
        xpcnn.fit("seed", (IMAGES, LABELS), epoch=2)
    with pytest.raises(XpcnnError, match="epochs must be >= 1"):
        xpcnn.fit("seed", (IMAGES, LABELS), epochs=0)
    with pytest.raises(XpcnnError, match="give the model and the data as fit's first two arguments"):
        xpcnn.fit("seed", (IMAGES, LABELS), dataset="fashion-mnist")
    with pytest.raises(XpcnnError, match="optimiser given to fit"):
        xpcnn.fit("seed", (IMAGES, LABELS), optimizer=xpcnn.optim.SGD(models.build("seed")))
