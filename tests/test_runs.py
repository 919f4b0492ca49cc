from pathlib import Path

import numpy as np
import pytest

from xpcnn.apps.report import confusion_matrix, per_class_accuracy
from xpcnn.backends.backend import get_backend
from xpcnn.backends.distributed import Communicator
from xpcnn.base.errors import ConfigError, XpcnnError
from xpcnn.data.checkpoint import Checkpoint, CheckpointError
from xpcnn.data.data import Dataset
from xpcnn.training.config import TrainConfig
from xpcnn.training.runs import resumed_config, train_run


def checkpoint_after(epochs_done, **config):
    meta = {"config": TrainConfig(**config).to_dict(), "state": {"epoch": epochs_done}}
    return Checkpoint(meta=meta, model_state={}, optimizer_state=None)


def test_resume_keeps_the_recorded_config_and_takes_more_epochs():
    config = resumed_config(checkpoint_after(1, lr=0.01, epochs=1), Path("run"), {"epochs": 3, "log_every": 7})
    assert (config.lr, config.epochs, config.log_every) == (0.01, 3, 7)


def test_resume_refuses_a_setting_that_changes_what_was_computed():
    with pytest.raises(ConfigError, match="lr cannot change when resuming") as err:
        resumed_config(checkpoint_after(1, epochs=2), Path("run"), {"lr": 0.1, "epochs": 3})
    assert err.value.setting == "lr"


def test_resume_of_a_finished_run_states_its_epochs_and_what_to_ask_for():
    with pytest.raises(ConfigError) as err:
        resumed_config(checkpoint_after(2, epochs=2), Path("run"), {})
    assert str(err.value) == (
        "run has already trained 2 epoch(s), all it was asked for: pass --epochs 3 or more to train longer"
    )
    assert err.value.setting == "epochs"


def test_resume_asking_for_fewer_epochs_than_the_run_has_states_the_runs_count_not_the_request():
    with pytest.raises(ConfigError) as err:
        resumed_config(checkpoint_after(21, epochs=21), Path("run"), {"epochs": 12})
    assert str(err.value) == (
        "run has already trained 21 epoch(s), --epochs 12 asks for no more: pass --epochs 22 or more to train longer"
    )


def test_a_setting_given_with_the_runs_own_value_is_no_change():
    config = resumed_config(checkpoint_after(1, lr=0.01, epochs=1), Path("run"), {"lr": 0.01, "epochs": 2})
    assert (config.lr, config.epochs) == (0.01, 2)


def test_the_refusal_of_a_change_states_the_runs_values_and_what_may_change():
    with pytest.raises(ConfigError) as err:
        overrides = {"seed": 4, "lr": 0.1, "augment": True}
        resumed_config(checkpoint_after(1, epochs=2, lr=0.01, seed=3), Path("run"), overrides)
    assert str(err.value) == (
        "--augment, --lr, --seed cannot change when resuming: run was trained with --no-augment, --lr 0.01, --seed 3 "
        "(of a run's settings only --epochs and --log-every can change)"
    )
    assert err.value.setting == "augment"


def test_confusion_matrix_rows_are_true_classes():
    labels, predictions = np.array([0, 0, 1, 2, 2, 2], np.uint8), np.array([0, 1, 1, 2, 0, 2])
    confusion = confusion_matrix(labels, predictions, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert per_class_accuracy(confusion) == [0.5, 1.0, pytest.approx(2 / 3), None]  # class 3: no images


def test_a_resume_past_the_end_of_an_epoch_over_several_ranks_is_refused(tmp_path):
    """129 images in global batches of 128 over 2 ranks: the last image does not split over them, so an epoch
    is one step. A checkpoint at step 1 (one process's, before its short batch) is at its end, where the ranks
    end the epoch (test_data_parallel); one at step 2 (256 images seen) points past it."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (129, 28, 28), dtype=np.uint8), rng.integers(0, 10, 129)
    dataset = Dataset("mnist", tuple("0123456789"), images, labels, images[:2], labels[:2])
    config = TrainConfig(model="seed", batch_size=128)
    partial = {"loss_sum": 512.0, "correct": 26, "seen": 256, "seconds": 1.0}
    state = {"epoch": 0, "step": 2, "global_step": 2, "partial": partial, "history": []}
    meta = {"config": config.to_dict(), "state": state, "normalization": {"mean": 0.5, "std": 0.3}}
    checkpoint = Checkpoint(meta, model_state={}, optimizer_state=None, path=tmp_path / "checkpoint.npz")
    second_rank = Communicator()  # rank 1 of 2: claims no directory; refused before its first collective
    second_rank.rank, second_rank.world_size = 1, 2
    with pytest.raises(CheckpointError, match="step 2 is past the end of an epoch of 1 steps"):
        train_run(config, get_backend("numpy"), dataset, tmp_path, resume=checkpoint, communicator=second_rank)


def test_training_images_of_one_value_are_refused_as_fit_refuses_them(tmp_path):
    images = np.full((10, 28, 28), 255, np.uint8)
    dataset = Dataset("mnist", tuple("0123456789"), images, np.arange(10), images[:2], np.arange(2))
    with pytest.raises(XpcnnError, match=r"every pixel of the training images is 1 \(in \[0, 1\]\): nothing to learn"):
        train_run(TrainConfig(model="seed"), get_backend("numpy"), dataset, tmp_path / "run")
