"""Test-time augmentation: its views against NumPy's padding and slicing, its average against one written out."""

import numpy as np
import pytest

from xpcnn import models
from xpcnn.backends.backend import get_backend
from xpcnn.data.device_data import DeviceSplit, Normalization
from xpcnn.training.train import evaluate, predict_probabilities
from xpcnn.training.tta import View, apply_view, evaluate_tta, views


def moved(images: np.ndarray, view: View, fill: float) -> np.ndarray:
    """The reference: mirror, pad by the shift with ``fill``, slice back."""
    if view.flip:
        images = images[..., ::-1]
    p = max(abs(view.down), abs(view.right), 1)
    padded = np.pad(images, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)
    h, w = images.shape[-2:]
    return padded[..., p - view.down : p - view.down + h, p - view.right : p - view.right + w]


def test_views_are_the_image_its_shifts_and_their_mirrors():
    plain = views()
    assert plain[0] == View() and len(set(plain)) == 5
    assert {(v.down, v.right) for v in plain[1:]} == {(-1, 0), (1, 0), (0, -1), (0, 1)}
    mirrored = views(flip=True, shift=2)
    assert len(set(mirrored)) == 10 and sum(v.flip for v in mirrored) == 5
    assert max(abs(v.down) + abs(v.right) for v in mirrored) == 2
    for shift in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="shift"):
            views(shift=shift)


def test_apply_view_matches_numpy(backend):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 2, 6, 5)).astype(np.float32)
    x = backend.asarray(images)
    for view in (*views(flip=True), View(2, -3), View(-3, 1, True)):
        out = backend.to_host(apply_view(x, view, fill=-0.5))
        np.testing.assert_array_equal(out, moved(images, view, -0.5), err_msg=str(view))


def test_one_view_is_plain_evaluation(backend):
    rng = np.random.default_rng(1)
    images, labels = rng.random((50, 28, 28)).astype(np.float32), rng.integers(0, 10, 50)
    model = models.build("convnet-bn", 0).to(backend)
    with backend.activate():
        split = DeviceSplit.from_host(backend, images, labels, Normalization(0.2, 0.3))
        plain = evaluate(model, split, backend, batch_size=16)
        augmented = evaluate_tta(model, split, backend, (View(),), batch_size=16)
    np.testing.assert_array_equal(augmented.predictions, plain.predictions)
    assert augmented.accuracy == plain.accuracy
    assert augmented.loss == pytest.approx(plain.loss, rel=1e-5)


def test_the_average_of_the_views_written_out():
    """The mean of the softmax over the views, each view made by NumPy and predicted on its own."""
    backend = get_backend("numpy")
    rng = np.random.default_rng(2)
    images, labels = rng.random((40, 28, 28)), rng.integers(0, 10, 40)
    norm, chosen = Normalization(0.2, 0.3), views(flip=True)
    fill = -norm.mean / norm.std
    model = models.build("deepnet", 0).to(backend, dtype=np.float64)
    split = DeviceSplit.from_host(backend, images, labels, norm, dtype=np.float64)
    probabilities = np.mean(
        [predict_probabilities(model, moved(split.images, view, fill), batch_size=7) for view in chosen], axis=0
    )
    result = evaluate_tta(model, split, backend, chosen, fill=fill, batch_size=16)
    np.testing.assert_array_equal(result.predictions, np.argmax(probabilities, axis=1))
    assert result.accuracy == np.mean(np.argmax(probabilities, axis=1) == labels)
    assert result.loss == pytest.approx(np.mean(-np.log(probabilities[np.arange(40), labels])), rel=1e-12)
    # The views do change the answer: the average differs from the plain image's.
    plain = predict_probabilities(model, split.images)
    assert not np.allclose(plain, probabilities)


def test_an_empty_split_and_no_views():
    backend = get_backend("numpy")
    model = models.build("seed", 0)
    empty = DeviceSplit(np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64))
    assert evaluate_tta(model, empty, backend, views()).accuracy == 0.0
    with pytest.raises(ValueError, match="no views"):
        evaluate_tta(model, empty, backend, ())
