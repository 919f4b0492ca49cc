from pathlib import Path

import numpy as np
import pytest

from xpcnn.checkpoint import Checkpoint
from xpcnn.config import TrainConfig
from xpcnn.errors import ConfigError
from xpcnn.runs import confusion_matrix, per_class_accuracy, resumed_config


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


def test_resume_of_a_finished_run_asks_for_more_epochs():
    with pytest.raises(ConfigError, match="run already finished 2 epoch"):
        resumed_config(checkpoint_after(2, epochs=2), Path("run"), {})


def test_confusion_matrix_rows_are_true_classes():
    labels, predictions = np.array([0, 0, 1, 2, 2, 2], np.uint8), np.array([0, 1, 1, 2, 0, 2])
    confusion = confusion_matrix(labels, predictions, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(per_class_accuracy(confusion), [0.5, 1.0, 2 / 3, 0.0])
