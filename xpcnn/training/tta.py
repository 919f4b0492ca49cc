"""Test-time augmentation: a model's softmax averaged over fixed views of each image.

A view is a deterministic shift (and, for a model trained with flips, a mirror image) of the whole
batch, made by the training augmentation's own :func:`xpcnn.data.augment.flip_and_crop`: the
content moves by whole pixels and the pixels it uncovers read the background.  The prediction is the
class of the mean of the views' probabilities; the loss is the mean of ``-log`` of that mean at the
true class.  Reported apart from the plain test accuracy (``xpcnn evaluate --tta``): it costs one
forward pass per view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace, device

from ..backends.backend import Backend
from ..data.augment import flip_and_crop
from ..data.device_data import DeviceSplit, EvalResult, averaged_result
from ..nn import Sequential
from .train import predict_probabilities


@dataclass(frozen=True)
class View:
    """The content moved ``down`` and ``right`` pixels (negative: up, left), mirrored first with ``flip``."""

    down: int = 0
    right: int = 0
    flip: bool = False


def views(flip: bool = False, shift: int = 1) -> tuple[View, ...]:
    """The image, its four shifts by ``shift`` pixels (up, down, left, right), and with ``flip`` the mirror
    image of each of those five."""
    if not (isinstance(shift, int) and not isinstance(shift, bool) and shift >= 1):
        raise ValueError(f"views: shift must be an int >= 1 (pixels), got {shift!r}")
    plain = (View(), View(-shift, 0), View(shift, 0), View(0, -shift), View(0, shift))
    return plain + tuple(View(v.down, v.right, True) for v in plain) if flip else plain


def apply_view(images, view: View, fill: float = 0.0):
    """``images`` (B, C, H, W) as ``view`` sees them: mirrored, then moved, uncovered pixels ``fill``."""
    xp = array_namespace(images)
    padding = max(abs(view.down), abs(view.right))
    b, dev = images.shape[0], device(images)
    flips = xp.full((b,), view.flip, dtype=xp.bool, device=dev) if view.flip else None
    if padding == 0:
        return flip_and_crop(images, flips, None, None, 0, fill)
    tops = xp.full((b,), padding - view.down, dtype=xp.int64, device=dev)
    lefts = xp.full((b,), padding - view.right, dtype=xp.int64, device=dev)
    return flip_and_crop(images, flips, tops, lefts, padding, fill)


def evaluate_tta(
    model: Sequential, split: DeviceSplit, backend: Backend, views: tuple[View, ...], fill: float = 0.0, batch_size=1000
) -> EvalResult:
    """Mean loss and accuracy of ``model`` (evaluation mode) on ``split`` with the softmax averaged over ``views``.

    ``fill`` is a blank pixel's value after normalisation (``Normalization.background``).  The loss is
    ``mean(-log(mean over views of p(true class)))``; the views' probabilities are summed in float64 on the host.
    """
    if not views:
        raise ValueError("evaluate_tta: no views")
    labels = backend.to_host(split.labels).astype(np.int64)
    if labels.size == 0:
        return averaged_result(np.zeros((0, 0)), labels)
    chunks = []
    for x, _ in split.batches(batch_size):
        views_of_x = [predict_probabilities(model, apply_view(x, view, fill), batch_size) for view in views]
        chunks.append(sum(p.astype(np.float64) for p in views_of_x) / len(views))
    return averaged_result(np.concatenate(chunks), labels)
