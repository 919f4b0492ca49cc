"""xpcnn.fit / evaluate / save: one call each, on arrays or a dataset name, with callbacks."""

import numpy as np
import pytest

import xpcnn
from xpcnn import models, nn, optim
from xpcnn.base.errors import ConfigError, XpcnnError
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.data.device_data import Normalization
from xpcnn.training.config import TrainConfig
from xpcnn.training.runs import model_from_checkpoint, train_run


def blobs(n=240, seed=0):
    """``n`` noisy uint8 copies of 10 random 28x28 blob prototypes, and their labels."""
    rng = np.random.default_rng(seed)
    prototypes = (np.random.default_rng(99).random((10, 28, 28)) > 0.7) * 200.0
    labels = rng.integers(0, 10, n)
    return np.clip(prototypes[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255).astype(np.uint8), labels


def test_predict_gives_the_probabilities_evaluate_scores(backend):
    images, labels = blobs(120)
    model = models.build("seed", seed=0)
    history = xpcnn.fit(model, (images, labels), epochs=1, batch_size=32, lr=0.01, backend=backend)
    probabilities = xpcnn.predict(model, images, normalization=history.normalization, batch_size=50)
    assert probabilities.shape == (120, 10) and isinstance(probabilities, np.ndarray)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    result = xpcnn.evaluate(model, images, labels, normalization=history.normalization)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), result.predictions)
    loss = -np.mean(np.log(probabilities[np.arange(120), labels]))
    assert loss == pytest.approx(result.loss, rel=1e-4)
    one = xpcnn.predict(model, images[7], normalization=history.normalization)  # one image (H, W)
    np.testing.assert_allclose(one, probabilities[7:8], rtol=1e-5, atol=1e-7)
    floats = xpcnn.predict(model, images[:3, None] / 255.0, normalization=history.normalization)
    np.testing.assert_allclose(floats, probabilities[:3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((0, 28, 28), np.uint8), "N >= 1"),
        (np.zeros((2, 3, 28, 28), np.uint8), "shape"),
        (np.full((2, 28, 28), 2.0), r"\[0, 1\]"),
        (np.zeros((2, 28, 28), np.int64), "dtype"),
        (np.zeros((2, 5, 5), np.uint8), "does not take images"),
    ],
)
def test_predict_refuses_images_it_cannot_use_in_one_line(images, match):
    model = models.build("seed", seed=0)
    with pytest.raises(XpcnnError, match=match) as error:
        xpcnn.predict(model, images, normalization=Normalization(0.1, 0.3))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="normalization"):
        xpcnn.predict(model, np.zeros((1, 28, 28), np.uint8), normalization=(0.1, 0.3))


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
    assert xpcnn.fit("seed", (images, labels), epochs=1, callbacks=None).state.epoch == 1  # Keras' default


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


def test_a_model_of_your_own_layers_is_recorded_as_custom_and_not_rebuilt_as_a_named_one(tmp_path):
    """convnet's parameter names and shapes with a Dropout(0) where convnet has a ReLU: it was recorded as convnet,
    and the command line rebuilt convnet and predicted with it, silently giving other classes."""
    from click.testing import CliRunner

    from xpcnn.apps.cli import main

    convnet = models.build("convnet", seed=0)
    layers = convnet.layers
    relu = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU))
    own = nn.Sequential(*layers[:relu], nn.Dropout(0.0), *layers[relu + 1 :])
    assert [(k, v.shape) for k, v in own.state_dict().items()] == [
        (k, v.shape) for k, v in convnet.state_dict().items()
    ]
    history = xpcnn.fit(own, (IMAGES, LABELS), batch_size=10, backend="numpy")
    assert history.config.model == "custom"
    xpcnn.save(tmp_path / "own.npz", own, history)
    checkpoint = load_checkpoint(tmp_path / "own.npz")
    with pytest.raises(ConfigError, match="own.npz holds a model of your own layers .*load the checkpoint's model_st"):
        model_from_checkpoint(checkpoint, xpcnn.get_backend("numpy"))
    np.save(tmp_path / "one.npy", IMAGES[0])
    for command in (["predict", "own.npz", "one.npy"], ["export", "own.npz", "--format", "onnx", "--output", "o"]):
        result = CliRunner().invoke(main, [*command[:1], *(str(tmp_path / a) if "." in a else a for a in command[1:])])
        assert result.exit_code == 1 and result.output.startswith(f"Error: {tmp_path / 'own.npz'} holds a model of")
        assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "run").mkdir()
    xpcnn.save(tmp_path / "run" / "checkpoint.npz", own, history)
    resumed = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "run"), "--epochs", "1"])
    assert resumed.output.startswith(f"Error: {tmp_path / 'run'} holds a model of your own layers"), resumed.output
    with pytest.raises(ConfigError, match="^unknown model 'custom'"):
        xpcnn.fit("custom", (IMAGES, LABELS))


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


def test_a_named_model_trains_on_28x28_images_only():
    """lenet takes 30x30 images too, but predict, export and serve would give its checkpoint 28x28 ones."""
    padded = np.pad(IMAGES, ((0, 0), (1, 1), (1, 1)))
    for model in ("lenet", models.build("lenet")):
        with pytest.raises(ConfigError, match="^lenet is made for 28x28 images, not 30x30: build a model of your own"):
            xpcnn.fit(model, (padded, LABELS))
    own = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))
    xpcnn.fit(own, (padded, LABELS), epochs=1)


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


def test_settings_fit_would_drop_are_refused_for_the_model_it_is_given():
    with pytest.raises(ConfigError, match="momentum 0.5 is SGD's") as error:
        xpcnn.fit("seed", (IMAGES, LABELS), optimizer="adam", momentum=0.5)
    assert error.value.setting == "momentum"
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="has no batch-norm layer"):
        xpcnn.fit(plain, (IMAGES, LABELS), recalibrate_bn=True)
    normed = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10))  # its own, under no model's name
    history = xpcnn.fit(normed, (IMAGES, LABELS), recalibrate_bn=True, backend="numpy")
    assert history.records[-1]["bn_recalibrated"]


def test_an_optimiser_given_to_fit_trains_at_its_own_lr_and_the_history_records_it(tmp_path):
    images, labels = blobs()
    model = models.build("seed", seed=0)
    given = optim.Adam(model, lr=1e-4, weight_decay=1e-3)
    history = xpcnn.fit(model, (images, labels), optimizer=given, epochs=2, batch_size=32, schedule="constant")
    assert [record["lr"] for record in history.records] == [1e-4, 1e-4]
    assert given.lr == 1e-4  # its peak again: a second fit with it schedules from there too
    recorded = (history.config.optimizer, history.config.lr, history.config.weight_decay, history.config.ema)
    assert recorded == ("adam", 1e-4, 1e-3, 0.0)
    xpcnn.save(tmp_path / "seed.npz", model, history)
    assert load_checkpoint(tmp_path / "seed.npz").meta["config"]["optimizer"] == "adam"
    sgd = optim.SGD(model, lr=0.02, momentum=0.5)
    config = xpcnn.fit(model, (images, labels), optimizer=sgd, batch_size=32).config
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay) == ("sgd", 0.02, 0.5, 0.0)
    assert xpcnn.fit(model, (images, labels), optimizer=optim.AdamW(model), batch_size=32).config.optimizer == "adamw"


@pytest.mark.parametrize("setting, value", [("lr", 0.1), ("momentum", 0.5), ("weight_decay", 0.0), ("ema", 0.9)])
def test_a_setting_the_given_optimiser_owns_is_refused_beside_it(setting, value):
    model = models.build("seed")
    with pytest.raises(ConfigError, match=f"^{setting} applies to an optimiser given by name") as error:
        xpcnn.fit(model, (IMAGES, LABELS), optimizer=optim.SGD(model, lr=0.01), **{setting: value})
    assert error.value.setting == setting and "\n" not in str(error.value)


def test_an_optimiser_fit_cannot_record_is_refused():
    class Custom(optim.Optimizer):
        pass

    model = models.build("seed")
    with pytest.raises(ConfigError, match="an SGD, Adam or AdamW optimiser") as error:
        xpcnn.fit(model, (IMAGES, LABELS), optimizer=Custom(model, lr=0.01))
    assert error.value.setting == "optimizer"


HEADS = {  # five outputs, the last layer not a Linear one
    "nested": lambda: nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(784, 16, rng=0), nn.ReLU()), nn.Sequential(nn.Linear(16, 5, rng=1))
    ),
    "relu": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 5, rng=0), nn.ReLU()),
    "dropout": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 5, rng=0), nn.Dropout(0.1)),
}


@pytest.mark.parametrize("head", HEADS)
def test_labels_beyond_the_models_outputs_are_refused_whatever_its_last_layer(head, backend):
    model = HEADS[head]().to(backend)
    message = r"labels must lie in \[0, 4\] \(the model's outputs\), got values in \[0, 9\]"
    with pytest.raises(ConfigError, match=message):
        xpcnn.fit(model, (IMAGES, LABELS), backend=backend)
    with pytest.raises(ConfigError, match=message):
        xpcnn.evaluate(model, IMAGES, LABELS, normalization=Normalization(0.3, 0.4))
    history = xpcnn.fit(model, (IMAGES, LABELS % 5), batch_size=10, backend=backend)
    assert history.dataset.classes == ("0", "1", "2", "3", "4")


def test_a_float64_model_fits_and_evaluates_on_float64_data():
    model = models.build("seed", seed=0).to(xpcnn.get_backend("numpy"), np.float64)
    history = xpcnn.fit(model, (IMAGES, LABELS), validation=(IMAGES, LABELS), batch_size=10, backend="numpy")
    assert all(value.dtype == np.float64 for _, value in model.named_parameters())
    result = xpcnn.evaluate(model, IMAGES, LABELS, normalization=history.normalization)
    assert result.loss == pytest.approx(history.records[-1]["val_loss"], rel=1e-12)


def test_save_refuses_a_model_its_history_did_not_train_and_no_history_before_writing(tmp_path):
    history = xpcnn.fit("seed", (IMAGES, LABELS), batch_size=10)
    with pytest.raises(ConfigError, match=r"^the model is not the one history trained \(seed"):
        xpcnn.save(tmp_path / "lenet.npz", models.build("lenet"), history)
    with pytest.raises(ConfigError, match="^history must be the History fit returned, got NoneType"):
        xpcnn.save(tmp_path / "none.npz", history.optimizer.model, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("validation", [(IMAGES,), (IMAGES, LABELS, LABELS), []])
def test_a_validation_sequence_that_is_not_images_and_labels_is_refused(validation):
    with pytest.raises(ConfigError, match=r"validation must be a count, a fraction or a pair \(images, labels\)") as e:
        xpcnn.fit("seed", (IMAGES, LABELS), validation=validation)
    assert e.value.setting == "validation"


def test_a_batch_of_one_the_models_batch_norm_cannot_train_on_is_refused_before_the_first_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16, rng=0), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    recorder = Recorder()
    for batch_size in (7, 1):  # 8 images: a last batch of one; every batch of one
        with pytest.raises(ConfigError, match="cannot train on .BatchNorm1d.*choose another batch_size$") as error:
            xpcnn.fit(model, (IMAGES[:8], LABELS[:8]), batch_size=batch_size, callbacks=[recorder])
        assert error.value.setting == "batch_size" and "\n" not in str(error.value)
    assert recorder.steps == []
    xpcnn.fit(model, (IMAGES[:8], LABELS[:8]), batch_size=4)
    # Batch norm over more than one value per channel trains on a batch of one, as xpcnn train does.
    assert len(xpcnn.fit("lenet-bn", (IMAGES[:8], LABELS[:8]), batch_size=7).records) == 1
