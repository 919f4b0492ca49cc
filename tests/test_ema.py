"""The moving average of the weights (``ema``) through the trainer: trained weights unchanged, the average
evaluated every epoch and kept (in the model after ``fit``, from a run's checkpoint), resumed bit for bit."""

import numpy as np
import pytest
from test_fitting import blobs
from test_train import assert_bit_identical, config

import xpcnn
from xpcnn import models, optim
from xpcnn.backends.backend import get_backend, to_host
from xpcnn.base.errors import ConfigError
from xpcnn.data import device_data
from xpcnn.data.checkpoint import CheckpointError, load_checkpoint
from xpcnn.training import runs, train

DECAY = 0.9


def saved_average(checkpoint) -> dict[str, np.ndarray]:
    """The debiased moving average a checkpoint's optimiser state keeps, by its formula (``ema`` = DECAY)."""
    steps, slots = checkpoint.optimizer_state["steps"], checkpoint.optimizer_state["state"]
    return {name: np.asarray(slot["ema"]) / (1 - DECAY**steps) for name, slot in slots.items()}


def test_fit_evaluates_the_average_and_leaves_it_in_the_model(backend):
    images, labels = blobs()
    validation = blobs(60, seed=1)
    model = models.build("seed", seed=0)
    history = xpcnn.fit(
        model, (images, labels), validation=validation, epochs=2, batch_size=32, lr=0.01, ema=DECAY, backend=backend
    )
    assert history.config.ema == DECAY and history.optimizer.ema == DECAY
    averaged = history.optimizer.averaged_parameters()
    assert all(np.array_equal(to_host(value), to_host(averaged[name])) for name, value in model.named_parameters())
    result = xpcnn.evaluate(model, validation[0][:, None], validation[1], normalization=history.normalization)
    assert result.accuracy == pytest.approx(history.records[-1]["val_accuracy"])
    assert result.loss == pytest.approx(history.records[-1]["val_loss"], rel=1e-5)
    plain = xpcnn.fit(
        models.build("seed", seed=0), (images, labels), validation=validation, epochs=2, batch_size=32, lr=0.01,
        backend=backend,
    )  # fmt: skip
    assert plain.records[-1]["val_loss"] != history.records[-1]["val_loss"]  # the average, not the last weights


def test_fit_takes_the_average_of_an_optimiser_given_with_it_and_refuses_the_setting_beside_one():
    images, labels = blobs()
    model = models.build("seed", seed=0)
    given = optim.SGD(model, lr=0.01, momentum=0.9, ema=DECAY)
    history = xpcnn.fit(model, (images, labels), optimizer=given, epochs=1, batch_size=32, backend="numpy")
    averaged = given.averaged_parameters()
    assert history.optimizer is given and given.steps == 8
    assert all(np.array_equal(value, averaged[name]) for name, value in model.named_parameters())
    with pytest.raises(ConfigError, match="ema applies to an optimiser given by name") as error:
        xpcnn.fit(model, (images, labels), optimizer=optim.SGD(model, lr=0.01), ema=DECAY, backend="numpy")
    assert error.value.setting == "ema"


@pytest.mark.slow
def test_a_run_trains_the_same_weights_and_its_checkpoint_gives_the_average_it_evaluated(synthetic, tmp_path):
    """With batch-norm recalibration too: the last epoch's statistics are those of the averaged weights."""
    numpy = get_backend("numpy")
    settings = {"model": "convnet-bn", "optimizer": "sgd", "lr": 0.05, "recalibrate_bn": True}
    state = runs.train_run(config(**settings, ema=DECAY), numpy, synthetic, tmp_path / "ema")
    plain = runs.train_run(config(**settings), numpy, synthetic, tmp_path / "plain")
    ema, trained = load_checkpoint(tmp_path / "ema"), load_checkpoint(tmp_path / "plain")
    for key, value in ema.model_state.items():  # the weights it trains are the plain run's
        assert np.array_equal(value, trained.model_state[key]) == ("running" not in key), key
    assert state.history[-1]["test_loss"] != plain.history[-1]["test_loss"]

    model, norm = runs.model_from_checkpoint(ema, numpy)
    average = saved_average(ema)
    parameters = dict(model.named_parameters())
    assert parameters.keys() == average.keys()
    assert all(np.array_equal(value, average[key]) for key, value in parameters.items())
    test = device_data.DeviceSplit.from_host(numpy, synthetic.test_images, synthetic.test_labels, norm)
    result = train.evaluate(model, test, numpy)
    assert (result.accuracy, result.loss) == pytest.approx(
        (state.history[-1]["test_accuracy"], state.history[-1]["test_loss"]), rel=1e-12
    )
    split = device_data.DeviceSplit.from_host(numpy, synthetic.train_images, synthetic.train_labels, norm)
    train.recalibrate_on(model, split)  # again, on the averaged weights: the statistics the run kept
    for key, value in model.state_dict().items():
        if "running" in key:
            np.testing.assert_allclose(value, ema.model_state[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_a_resumed_run_keeps_averaging_as_a_straight_one(synthetic, tmp_path):
    numpy = get_backend("numpy")
    cfg = {"optimizer": "sgd", "lr": 0.05, "schedule": "constant", "ema": DECAY}
    runs.train_run(config(**cfg), numpy, synthetic, tmp_path / "straight")
    runs.train_run(config(**cfg, epochs=1), numpy, synthetic, tmp_path / "resumed")
    checkpoint = load_checkpoint(tmp_path / "resumed")
    assert all(set(slots) == {"momentum", "ema"} for slots in checkpoint.optimizer_state["state"].values())
    runs.train_run(config(**cfg), numpy, synthetic, tmp_path / "resumed", resume=checkpoint)
    assert_bit_identical(tmp_path / "straight", tmp_path / "resumed")


def test_a_checkpoint_of_a_run_with_ema_but_without_the_average_is_refused(synthetic, tmp_path):
    numpy = get_backend("numpy")
    runs.train_run(config(model="seed", epochs=1, optimizer="sgd", lr=0.01), numpy, synthetic, tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run")
    checkpoint.meta["config"]["ema"] = DECAY  # as if trained with it, the average lost
    with pytest.raises(CheckpointError, match=r"run/checkpoint\.npz: optimiser state holds no moving average"):
        runs.model_from_checkpoint(checkpoint, numpy)
    checkpoint.optimizer_state = None  # no optimiser state at all: nowhere to take the average from
    with pytest.raises(CheckpointError, match="holds no optimiser state, which keeps the moving average"):
        runs.model_from_checkpoint(checkpoint, numpy)


@pytest.fixture(scope="module")
def ema_checkpoint(synthetic, tmp_path_factory):
    """The checkpoint of a short NumPy run trained with ``ema``."""
    run = tmp_path_factory.mktemp("ema") / "run"
    settings = {"model": "seed", "epochs": 1, "optimizer": "sgd", "lr": 0.01, "ema": DECAY}
    runs.train_run(config(**settings), get_backend("numpy"), synthetic, run)
    return load_checkpoint(run)


def test_a_checkpoint_gives_the_average_on_every_backend(backend, ema_checkpoint):
    average = saved_average(ema_checkpoint)
    model, _ = runs.model_from_checkpoint(ema_checkpoint, backend)
    parameters = {name: to_host(value) for name, value in model.named_parameters()}
    assert parameters.keys() == average.keys()
    for name, value in parameters.items():
        np.testing.assert_allclose(value, average[name], rtol=1e-6, atol=1e-7, err_msg=name)
        assert not np.allclose(value, ema_checkpoint.model_state[name])  # the average, not the trained weights
