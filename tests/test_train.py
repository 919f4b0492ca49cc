"""The trainer: run directories, resume equality, Ctrl-C, divergence, schedules, real MNIST."""

import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
from helpers import InterruptAt

from xpcnn import models, nn, optim
from xpcnn.backends.backend import get_backend
from xpcnn.data import augment, device_data
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.training import runs, schedules, train
from xpcnn.training.config import TrainConfig, make_augmentation, make_optimizer


def config(**overrides):
    values = dict(model="convnet", epochs=2, batch_size=64, optimizer="adam", lr=2e-3, seed=3, log_every=1)
    return TrainConfig(**{**values, **overrides})


def arrays_of(run_dir):
    ckpt = load_checkpoint(run_dir)
    arrays = {f"model/{k}": v for k, v in ckpt.model_state.items()}
    for name, slots in ckpt.optimizer_state["state"].items():
        arrays.update({f"optim/{name}/{slot}": v for slot, v in slots.items()})
    return ckpt, arrays


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in {"seconds", "eval_seconds", "images_per_second"}}


def assert_bit_identical(run_a, run_b):
    (ckpt_a, a), (ckpt_b, b) = arrays_of(run_a), arrays_of(run_b)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert ckpt_a.optimizer_state["steps"] == ckpt_b.optimizer_state["steps"]
    history_a = json.loads((run_a / "history.json").read_text())
    history_b = json.loads((run_b / "history.json").read_text())
    for ra, rb in zip(history_a, history_b, strict=True):
        assert without_timings(ra) == without_timings(rb)


@pytest.mark.slow
def test_run_directory_contents(synthetic, tmp_path):
    state = runs.train_run(config(epochs=2), get_backend("numpy"), synthetic, tmp_path / "run")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.npz", "config.json", "history.json"]
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    required = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "images_per_second"}
    assert all(required <= set(r) for r in history)
    assert history == state.history
    ckpt = load_checkpoint(run)
    assert ckpt.meta["state"]["epoch"] == 2 and ckpt.meta["config"]["model"] == "convnet"
    assert ckpt.meta["classes"] == [str(d) for d in range(10)]
    assert json.loads((run / "config.json").read_text())["lr"] == 2e-3
    assert history[-1]["test_accuracy"] > 0.9  # the synthetic problem is easy


@pytest.mark.slow
def test_one_epoch_then_resume_equals_two_epochs_straight(synthetic, tmp_path):
    numpy = get_backend("numpy")
    runs.train_run(config(epochs=2, schedule="constant"), numpy, synthetic, tmp_path / "straight")
    runs.train_run(config(epochs=1, schedule="constant"), numpy, synthetic, tmp_path / "resumed")
    ckpt = load_checkpoint(tmp_path / "resumed")
    runs.train_run(config(epochs=2, schedule="constant"), numpy, synthetic, tmp_path / "resumed", resume=ckpt)
    assert_bit_identical(tmp_path / "straight", tmp_path / "resumed")


def test_recalibration_takes_no_batch_of_one_that_1d_batch_norm_refuses():
    numpy = get_backend("numpy")
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8, rng=np.random.default_rng(0)), nn.BatchNorm1d(8))
    images = np.random.default_rng(1).integers(0, 256, (1001, 28, 28), dtype=np.uint8)
    split = device_data.DeviceSplit.from_host(
        numpy, images, np.zeros(1001, np.int64), device_data.Normalization(0.1, 0.3)
    )
    assert train.recalibrate_on(model, split)
    features = model[1](model[0](split.images))
    np.testing.assert_allclose(model[2].buffers["running_mean"], features.mean(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_batchnorm_recalibration_after_the_last_epoch(synthetic, tmp_path):
    """The last epoch's record and checkpoint hold the recalibrated model; resuming to more epochs ends the same."""
    numpy = get_backend("numpy")
    cfg = {"model": "convnet-bn", "augment": True, "recalibrate_bn": True, "schedule": "constant"}
    plain = runs.train_run(config(**{**cfg, "recalibrate_bn": False}), numpy, synthetic, tmp_path / "plain")
    state = runs.train_run(config(**cfg), numpy, synthetic, tmp_path / "straight")
    assert ["bn_recalibrated" in r for r in state.history] == [False, True]
    assert without_timings(state.history[0]) == without_timings(plain.history[0])

    # The same weights as without recalibration, other running statistics: those of the plain training images.
    (ckpt, recalibrated), (_, trained) = arrays_of(tmp_path / "straight"), arrays_of(tmp_path / "plain")
    for key in recalibrated:
        assert np.array_equal(recalibrated[key], trained[key]) == ("running" not in key), key
    model, norm = runs.model_from_checkpoint(load_checkpoint(tmp_path / "plain"), numpy)
    split = device_data.DeviceSplit.from_host(numpy, synthetic.train_images, synthetic.train_labels, norm)
    nn.recalibrate_batchnorm(model, (images for images, _ in split.batches(1000)))
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, ckpt.model_state[key], rtol=1e-6, atol=1e-7)
    test = device_data.DeviceSplit.from_host(numpy, synthetic.test_images, synthetic.test_labels, norm)
    assert train.evaluate(model, test, numpy).accuracy == state.history[-1]["test_accuracy"]

    # A 1-epoch run recalibrates after its epoch; continued to 2 epochs, it recalibrates again and ends the same.
    runs.train_run(config(**cfg, epochs=1), numpy, synthetic, tmp_path / "resumed")
    ckpt = load_checkpoint(tmp_path / "resumed")
    resumed = runs.train_run(config(**cfg), numpy, synthetic, tmp_path / "resumed", resume=ckpt)
    (_, a), (_, b) = arrays_of(tmp_path / "straight"), arrays_of(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    assert without_timings(resumed.history[-1]) == without_timings(state.history[-1])


@pytest.mark.slow
def test_ctrl_c_at_an_epoch_end_then_resume_is_bit_identical(synthetic, tmp_path):
    """With a schedule that spans the whole run (one-cycle), stopping after epoch 1 and resuming changes nothing."""
    numpy = get_backend("numpy")
    runs.train_run(config(), numpy, synthetic, tmp_path / "straight")
    with pytest.raises(train.TrainingInterrupted, match="stopped by Ctrl-C after epoch 1; checkpoint written to "):
        runs.train_run(config(), numpy, synthetic, tmp_path / "stopped", progress=InterruptAt(1, 10))
    ckpt = load_checkpoint(tmp_path / "stopped")
    assert (ckpt.meta["state"]["epoch"], ckpt.meta["state"]["step"]) == (1, 0)
    runs.train_run(config(), numpy, synthetic, tmp_path / "stopped", resume=ckpt)
    assert_bit_identical(tmp_path / "straight", tmp_path / "stopped")


@pytest.mark.slow
def test_ctrl_c_mid_epoch_saves_the_position_and_resume_finishes_the_epoch(synthetic, tmp_path):
    numpy = get_backend("numpy")
    run = tmp_path / "run"
    with pytest.raises(train.TrainingInterrupted, match="stopped by Ctrl-C at epoch 1, step 4"):
        runs.train_run(config(), numpy, synthetic, run, progress=InterruptAt(1, 4))
    ckpt = load_checkpoint(run)
    state = ckpt.meta["state"]
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 4, 4)
    assert state["partial"]["seen"] == 4 * 64
    assert json.loads((run / "history.json").read_text()) == []
    final = runs.train_run(config(), numpy, synthetic, run, resume=ckpt)
    assert [r["epoch"] for r in final.history] == [1, 2]
    assert final.global_step == 2 * math.ceil(600 / 64)
    assert load_checkpoint(run).optimizer_state["steps"] == final.global_step


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic, tmp_path, monkeypatch):
    steps_per_epoch = math.ceil(600 / 64)

    def poisoned(schedule, base_lr, step, total_steps):
        return math.nan if step >= steps_per_epoch + 2 else base_lr

    monkeypatch.setattr(train, "scheduled_lr", poisoned)
    run = tmp_path / "run"
    with pytest.raises(train.TrainingDiverged, match=r"loss became nan at epoch 2, step 4; the last good checkpoint"):
        runs.train_run(config(), get_backend("numpy"), synthetic, run)
    ckpt = load_checkpoint(run)
    assert ckpt.meta["state"]["epoch"] == 1
    assert all(np.isfinite(v).all() for v in ckpt.model_state.values())
    assert len(json.loads((run / "history.json").read_text())) == 1


@pytest.mark.slow
def test_a_non_finite_evaluation_loss_is_divergence(synthetic, tmp_path, monkeypatch):
    """A loss that is finite in training but not on the test split still stops the run, checkpoint kept."""
    original = train.evaluate

    def poisoned(model, split, backend, batch_size=1000):
        result = original(model, split, backend, batch_size)
        if train_epochs_done(tmp_path / "run") >= 1:
            return dataclasses.replace(result, loss=math.inf)
        return result

    monkeypatch.setattr(train, "evaluate", poisoned)
    with pytest.raises(
        train.TrainingDiverged, match=r"the test loss became inf after epoch 2; the last good checkpoint"
    ):
        runs.train_run(config(), get_backend("numpy"), synthetic, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run").meta["state"]["epoch"] == 1
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 1


def train_epochs_done(run) -> int:
    return len(json.loads((run / "history.json").read_text())) if (run / "history.json").exists() else 0


@pytest.mark.slow
def test_non_finite_weights_are_divergence(synthetic, tmp_path, monkeypatch):
    """A weight that becomes infinite at the last step of an epoch is caught before that epoch is saved."""
    original = optim.Adam._rule
    last_step = 2 * math.ceil(600 / 64)

    def poisoned(self, param, pieces, slots, lr, steps):
        param, slots = original(self, param, pieces, slots, lr, steps)
        if steps == last_step:
            param[0] = np.inf
        return param, slots

    monkeypatch.setattr(optim.Adam, "_rule", poisoned)
    with pytest.raises(train.TrainingDiverged, match=r"weights became non-finite \(0.weight\) in epoch 2"):
        runs.train_run(config(), get_backend("numpy"), synthetic, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["state"]["epoch"] == 1 and all(np.isfinite(v).all() for v in ckpt.model_state.values())


def test_divergence_in_the_first_epoch_says_no_checkpoint(synthetic, tmp_path):
    cfg = config(optimizer="sgd", lr=1e30, momentum=0.0, schedule="constant", epochs=1)
    with pytest.raises(train.TrainingDiverged, match="no checkpoint was written"):
        runs.train_run(cfg, get_backend("numpy"), synthetic, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_trainer_runs_on_every_backend(backend, synthetic):
    """The same fit code on each backend: data on the device, loss falls, accuracy rises."""
    cfg = config(model="seed", epochs=3, batch_size=50, lr=5e-3, schedule="constant")
    norm = device_data.Normalization.of(synthetic.train_images)
    with backend.activate():
        split = device_data.DeviceSplit.from_host(backend, synthetic.train_images, synthetic.train_labels, norm)
        test = device_data.DeviceSplit.from_host(backend, synthetic.test_images, synthetic.test_labels, norm)
        model = models.build("seed", seed=0).to(backend)
        trainer = train.Trainer(model, make_optimizer(cfg, model), backend, cfg)
        state = trainer.fit(split, {"test": test})
    losses = [r["train_loss"] for r in state.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] * 10 < losses[0], losses
    assert state.history[-1]["test_accuracy"] > 0.9


def test_evaluate_on_an_empty_split_and_predict():
    numpy = get_backend("numpy")
    model = models.build("seed")
    empty = device_data.DeviceSplit(np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64))
    assert train.evaluate(model, empty, numpy).accuracy == 0.0
    probabilities = train.predict_probabilities(model, np.zeros((3, 1, 28, 28), np.float32))
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_predict_leaves_the_models_mode_as_it_was():
    model = models.build("convnet")  # dropout: evaluation mode must hold while predicting
    images = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    probabilities = train.predict_probabilities(model, images)
    assert model.training and all(layer.training for layer in model.modules())
    np.testing.assert_array_equal(probabilities, train.predict_probabilities(model.eval(), images))
    assert not model.training


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(model="vgg"), "unknown model 'vgg'"),
        (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
        (dict(schedule="linear"), "unknown schedule 'linear'"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(lr=float("nan")), "learning rate must be a positive number"),
        (dict(lr=1e-46), r"learning rate must be a positive number of at least 1.18e-38 \(float32's least\)"),
        (dict(weight_decay=float("inf")), "weight decay must be a number >= 0"),
        (dict(weight_decay=float("nan")), "weight decay must be a number >= 0"),
        (dict(ema=1.0), r"ema must be a decay in \[0, 1\), got 1.0"),
        (dict(ema=float("nan")), "ema must be a decay in"),
        (dict(colour="blue"), r"unknown configuration keys \['colour'\]"),
    ],
)
def test_bad_config(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize("schedule", schedules.SCHEDULES)
def test_schedules_shape(schedule):
    lrs = [schedules.scheduled_lr(schedule, 0.1, step, 100) for step in range(100)]
    assert max(lrs) == pytest.approx(0.1, rel=1e-3)
    if schedule == "constant":
        assert set(lrs) == {0.1}
    elif schedule == "step":
        assert lrs[49] == 0.1 and lrs[50] == pytest.approx(0.01) and lrs[75] == pytest.approx(0.001)
    elif schedule == "cosine":
        assert lrs[0] == 0.1 and lrs[50] == pytest.approx(0.05) and lrs[-1] < 1e-3
    else:
        assert lrs[0] == pytest.approx(0.004) and lrs[30] == pytest.approx(0.1) and lrs[-1] < 1e-4
        assert lrs.index(max(lrs)) == 30


@pytest.mark.slow
def test_seed_model_learns_real_mnist_in_one_epoch(mnist_dir, tmp_path):
    """The original notebook's design: >= 92% after one epoch with plain SGD, lr 0.01, batch 32."""
    dataset = load_dataset("mnist", mnist_dir)
    cfg = TrainConfig(
        model="seed", epochs=1, batch_size=32, optimizer="sgd", lr=0.01, momentum=0.0, schedule="constant"
    )
    state = runs.train_run(cfg, get_backend("numpy"), dataset, tmp_path / "seed")
    assert state.history[0]["test_accuracy"] >= 0.92


def test_normalization_from_the_histogram_is_exact():
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    norm = device_data.Normalization.of(images)
    scaled = images / 255.0
    assert norm.mean == pytest.approx(scaled.mean(), rel=1e-12)
    assert norm.std == pytest.approx(scaled.std(), rel=1e-12)
    split = device_data.DeviceSplit.from_host(get_backend("numpy"), images, np.zeros(50, np.uint8), norm)
    np.testing.assert_allclose(split.images[:, 0], (scaled - norm.mean) / norm.std, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"augment": True}, {"elastic": 20.0, "elastic_sigma": 3.0}])
def test_augmentation_is_reproducible_and_changes_training(synthetic, tmp_path, options):
    numpy = get_backend("numpy")
    cfg = config(epochs=1, **options)
    for name in ("a", "b"):
        runs.train_run(cfg, numpy, synthetic, tmp_path / name)
    runs.train_run(config(epochs=1), numpy, synthetic, tmp_path / "plain")
    (_, a), (_, b), (_, plain) = (arrays_of(tmp_path / n) for n in ("a", "b", "plain"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model/0.weight"], plain["model/0.weight"])


def test_augmentation_options_build_the_transform():
    assert make_augmentation(config()) is None
    assert make_augmentation(config(augment=True)) == augment.Augmentation()
    elastic = make_augmentation(config(elastic=34.0))
    assert (elastic.max_shift, elastic.max_rotation, elastic.elastic_alpha, elastic.elastic_sigma) == (0, 0, 34.0, 4.0)
    both = make_augmentation(config(augment=True, elastic=10.0, elastic_sigma=5.0))
    assert both == augment.Augmentation(elastic_alpha=10.0, elastic_sigma=5.0)
    for bad in ({"elastic": -1.0}, {"elastic": float("nan")}, {"elastic_sigma": 0.0}):
        with pytest.raises(ValueError, match="elastic"):
            config(**bad)


def test_a_signal_after_an_all_reduce_waits_for_the_next_so_that_no_rank_stops_alone(synthetic):
    """Rank 0 of two gets Ctrl-C just after an all-reduce the other rank agreed in without it: it must not stop at
    that boundary (the other would wait for it at the next collective), but where the next all-reduce carries it."""
    from xpcnn.backends.distributed import Communicator

    class SignalAfterCall(Communicator):
        """Rank 0 of 2 whose partner adds nothing; Ctrl-C reaches this process just after all-reduce ``at``."""

        def __init__(self, at: int):
            self.rank, self.world_size, self.at, self.wishes = 0, 2, at, []

        def all_reduce_sum(self, array):
            if array.dtype == np.float64 and array.size <= 6:  # the trainer's agreement, not a gradient
                self.wishes.append(bool(array[-3] > 0))  # the Ctrl-C wish of [..., sigint, sigterm, callback]
                if len(self.wishes) == self.at:
                    os.kill(os.getpid(), signal.SIGINT)
            return array

        def broadcast(self, array):
            return array

    numpy = get_backend("numpy")
    cfg = config(model="seed", epochs=2, batch_size=50, log_every=2)
    norm = device_data.Normalization.of(synthetic.train_images)
    split = device_data.DeviceSplit.from_host(numpy, synthetic.train_images, synthetic.train_labels, norm)
    communicator = SignalAfterCall(at=3)
    model = models.build("seed", seed=0)
    trainer = train.Trainer(model, make_optimizer(cfg, model), numpy, cfg, communicator=communicator)
    with pytest.raises(train.TrainingInterrupted, match="stopped by Ctrl-C"):
        trainer.fit(split, {})
    assert communicator.wishes == [False, False, False, True], communicator.wishes


def test_augmentation_fills_in_the_background_of_light_images_too():
    """Dark ink on white (a mean above 1/2): shifts, crops and erasing fill in white, not MNIST's black."""
    assert device_data.Normalization(0.13, 0.31).background == pytest.approx(-0.13 / 0.31)
    assert device_data.Normalization(0.87, 0.31).background == pytest.approx(0.13 / 0.31)
    numpy = get_backend("numpy")
    config = TrainConfig(model="seed", batch_size=4, crop=3, erase=1.0)
    model = models.build("seed")
    white = (np.full((4, 28, 28), 255, np.uint8), np.zeros(4, np.uint8))
    norm = device_data.Normalization(0.9, 0.2)
    trainer, split, _ = train.start_training(model, make_optimizer(config, model), numpy, config, norm, white, {})
    images, _ = next(iter(split.batches(4)))
    augmented = make_augmentation(config)(images, numpy.generator(0, 0, 0), fill=trainer.step_runner.step.background)
    assert np.allclose(numpy.to_host(augmented), (1 - 0.9) / 0.2)  # white everywhere, crops and rectangles too
