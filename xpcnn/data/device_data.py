"""Labelled images on the device: normalisation, the one host-to-device copy of a split, batches, and what
evaluating a model over a split gives (``EvalResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.backend import Backend
from ..base.errors import XpcnnError

MIN_STD = 1e-6  # of the [0, 1] range: below it the images are one value, and 1 / std overflows float32 pixels


@dataclass(frozen=True)
class Normalization:
    """Per-pixel affine map applied to images scaled to [0, 1]: (x - mean) / std."""

    mean: float
    std: float

    def __post_init__(self):
        mean, std = self.mean, self.std
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (mean, std))
        if not (numbers and 0.0 <= mean <= 1.0 and MIN_STD <= std <= 1.0 and math.isfinite(mean + std)):
            raise XpcnnError(
                f"input normalisation must have a mean in [0, 1] and a std in [{MIN_STD:g}, 1], "
                f"got mean {mean!r}, std {std!r}"
            )

    @property
    def light_background(self) -> bool:
        """Whether the images are dark ink on a light background (mostly light: a mean above 1/2), not MNIST's
        light ink on black."""
        return self.mean > 0.5

    @property
    def background(self) -> float:
        """A blank pixel after normalisation (black, or white on a light background): what augmentation's
        shifts, crops and erasing fill in."""
        return ((1.0 if self.light_background else 0.0) - self.mean) / self.std

    @classmethod
    def of(cls, images: np.ndarray) -> Normalization:
        """Mean and standard deviation of training images, uint8 (0..255) or floats in [0, 1], in [0, 1] units.

        XpcnnError where every pixel has one value: nothing to learn from.  uint8 images are measured
        exactly from the histogram of the 256 pixel values, without a float copy of the images (which
        would be 376 MB for MNIST in float64).
        """
        if images.dtype == np.uint8:
            counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
            values = np.arange(256) / 255.0
            mean = counts @ values / counts.sum()
            std = np.sqrt(counts @ (values - mean) ** 2 / counts.sum())
            constant = np.count_nonzero(counts) == 1
        else:
            mean, std = np.mean(images, dtype=np.float64), np.std(images, dtype=np.float64)
            constant = std < MIN_STD
        if constant:
            raise XpcnnError(f"every pixel of the training images is {mean:g} (in [0, 1]): nothing to learn from")
        return cls(float(mean), float(std))


@dataclass
class DeviceSplit:
    """A labelled split on the device: images (N, 1, 28, 28) normalised floats, labels (N,) int64."""

    images: Any
    labels: Any

    def batches(self, batch_size: int):
        """(images, labels) in order, ``batch_size`` at a time (the last batch may be smaller)."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))  # the standard leaves out-of-range stops undefined
            yield self.images[start:stop, ...], self.labels[start:stop]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_host(cls, backend: Backend, images: np.ndarray, labels: np.ndarray, norm: Normalization, dtype=None):
        """Copy images (N, H, W) and labels (N,) to the device once, normalised there.

        uint8 images (0..255) are copied as they are and scaled on the device; float images are in [0, 1].
        """
        xp = backend.xp
        dtype = xp.float32 if dtype is None else dtype
        if images.dtype != np.uint8:
            return cls(
                normalize_images(backend, images[:, None], norm, dtype), xp.astype(backend.asarray(labels), xp.int64)
            )
        scaled = xp.astype(backend.asarray(images[:, None, :, :]), dtype)  # a new array: safe to update in place
        scaled *= 1.0 / 255.0  # in place, so the float dataset exists once (188 MB for MNIST in float32)
        scaled -= norm.mean
        scaled *= 1.0 / norm.std
        return cls(scaled, xp.astype(backend.asarray(labels), xp.int64))


def input_dtype(model):
    """The dtype a model's inputs must have: its parameters' (float32, or float64 for a model moved to float64);
    None for a model without any, whose inputs are then float32."""
    return next((value.dtype for value in model.parameters()), None)


def normalize_images(backend: Backend, images: np.ndarray, norm: Normalization, dtype=None):
    """Float images (N, 1, 28, 28) in [0, 1] on the host -> normalised device array."""
    xp = backend.xp
    dtype = xp.float32 if dtype is None else dtype
    return (backend.asarray(images, dtype) - norm.mean) * (1.0 / norm.std)


@dataclass
class EvalResult:
    """A model's mean loss, accuracy (0-1) and host predictions (N,) int64 over a split."""

    loss: float
    accuracy: float
    predictions: np.ndarray


def averaged_result(probabilities: np.ndarray, labels: np.ndarray) -> EvalResult:
    """The figures of averaged class probabilities (N, K) float64 against host ``labels`` (N,) int64: the loss is
    ``mean(-log(p[true class]))``, the prediction the most probable class."""
    if labels.size == 0:
        return EvalResult(0.0, 0.0, np.zeros(0, np.int64))
    predictions = np.argmax(probabilities, axis=1).astype(np.int64)
    with np.errstate(divide="ignore"):
        loss = float(np.mean(-np.log(probabilities[np.arange(len(labels)), labels])))
    return EvalResult(loss, float(np.mean(predictions == labels)), predictions)


def evaluate_batches(split: DeviceSplit, backend: Backend, batch_step, batch_size: int = 1000) -> EvalResult:
    """Run ``batch_step(x, y) -> (float64 sum of the losses, predictions (n,))`` over ``split`` and summarise it."""
    xp = backend.xp
    loss_sum = xp.asarray(0.0, dtype=xp.float64, device=backend.device)
    predictions = []
    for x, y in split.batches(batch_size):
        batch_loss, batch_predictions = batch_step(x, y)
        loss_sum = loss_sum + batch_loss
        predictions.append(batch_predictions)
    if not predictions:
        return EvalResult(0.0, 0.0, np.zeros(0, np.int64))
    predictions = backend.to_host(xp.concat(predictions))
    accuracy = float(np.mean(predictions == backend.to_host(split.labels)))
    return EvalResult(float(loss_sum) / len(split), accuracy, predictions)
