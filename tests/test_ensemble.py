"""Ensembles: the average of the members' softmax against one written out, and the figures of an average."""

import numpy as np
import pytest

from xpcnn import models
from xpcnn.backends.backend import get_backend
from xpcnn.data.device_data import DeviceSplit, Normalization, averaged_result
from xpcnn.training.ensemble import evaluate_ensemble
from xpcnn.training.train import evaluate, predict_probabilities


def test_averaged_result_by_hand():
    probabilities = np.array([[0.5, 0.5, 0.0], [0.1, 0.7, 0.2], [0.0, 0.1, 0.9]])
    result = averaged_result(probabilities, np.array([0, 2, 2]))
    assert result.predictions.tolist() == [0, 1, 2]  # a tie goes to the first class, as argmax does
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.loss == pytest.approx((-np.log(0.5) - np.log(0.2) - np.log(0.9)) / 3)
    assert averaged_result(np.array([[1.0, 0.0]]), np.array([1])).loss == np.inf  # certain and wrong
    empty = averaged_result(np.zeros((0, 0)), np.zeros(0, np.int64))
    assert (empty.loss, empty.accuracy, empty.predictions.size) == (0.0, 0.0, 0)


def test_the_average_of_the_members_written_out(backend):
    """Each member sees the images normalised its own way; the average is that of NumPy's probabilities."""
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40)
    specs = [("convnet-bn", 0, Normalization(0.13, 0.31)), ("lenet-bn", 1, Normalization(0.29, 0.35))]
    numpy = get_backend("numpy")
    expected = []
    for name, seed, norm in specs:
        model = models.build(name, seed).to(numpy)
        split = DeviceSplit.from_host(numpy, images, labels, norm)
        expected.append(predict_probabilities(model, split.images))
    mean = (expected[0].astype(np.float64) + expected[1]) / 2
    members = [(models.build(name, seed).to(backend), norm) for name, seed, norm in specs]
    with backend.activate():
        result = evaluate_ensemble(members, images, labels, backend, batch_size=16)
    np.testing.assert_array_equal(result.predictions, mean.argmax(axis=1))
    assert result.accuracy == np.mean(mean.argmax(axis=1) == labels)
    assert result.loss == pytest.approx(np.mean(-np.log(mean[np.arange(40), labels])), rel=1e-5)
    with backend.activate():  # the first member's probabilities given as computed, not its model
        joined = evaluate_ensemble(members[1:], images, labels, backend, computed=[expected[0]], batch_size=16)
    np.testing.assert_array_equal(joined.predictions, result.predictions)
    assert joined.loss == pytest.approx(result.loss, rel=1e-5)


def test_one_member_is_plain_evaluation(backend):
    rng = np.random.default_rng(4)
    images, labels = rng.random((30, 28, 28)).astype(np.float32), rng.integers(0, 10, 30)
    model, norm = models.build("convnet-bn", 2).to(backend), Normalization(0.2, 0.3)
    with backend.activate():
        plain = evaluate(model, DeviceSplit.from_host(backend, images, labels, norm), backend)
        alone = evaluate_ensemble([(model, norm)], images, labels, backend)
    np.testing.assert_array_equal(alone.predictions, plain.predictions)
    assert alone.loss == pytest.approx(plain.loss, rel=1e-5)


def test_no_members_and_no_images():
    numpy = get_backend("numpy")
    with pytest.raises(ValueError, match="no members"):
        evaluate_ensemble([], np.zeros((1, 28, 28), np.uint8), np.zeros(1), numpy)
    model = models.build("seed", 0).to(numpy)
    result = evaluate_ensemble([(model, Normalization(0.1, 0.3))], np.zeros((0, 28, 28), np.uint8), np.zeros(0), numpy)
    assert (result.accuracy, result.predictions.size) == (0.0, 0)
