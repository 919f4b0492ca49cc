"""Ensembles: the softmax of several trained models averaged, each model seeing the images normalised as it
was trained.  Reported apart from a run's own test accuracy (``xpcnn evaluate RUN --ensemble OTHER``): it
costs one forward pass per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backends.backend import Backend
from ..data.device_data import DeviceSplit, EvalResult, Normalization, averaged_result
from ..nn import Sequential
from .train import predict_probabilities


def evaluate_ensemble(
    members: Sequence[tuple[Sequential, Normalization]],
    images: np.ndarray,
    labels: np.ndarray,
    backend: Backend,
    computed: Sequence[np.ndarray] = (),
    batch_size: int = 1000,
) -> EvalResult:
    """Mean loss and accuracy of ``members`` (model, the normalisation it expects) with their softmax averaged.

    ``images``: host (N, H, W), uint8 or floats in [0, 1], as a dataset holds them; ``labels``: host (N,).
    ``computed``: the host probabilities (N, K) of members already evaluated on these images, averaged in.
    The loss is ``mean(-log(mean over members of p(true class)))``; the probabilities are summed in float64
    on the host, one member at a time, so the device holds one copy of the images at once.
    """
    if not members and not computed:
        raise ValueError("evaluate_ensemble: no members")
    labels = np.asarray(labels).astype(np.int64)
    if labels.size == 0:
        return averaged_result(np.zeros((0, 0)), labels)
    total = sum(np.asarray(p, np.float64) for p in computed)
    for model, normalization in members:
        split = DeviceSplit.from_host(backend, images, labels, normalization)
        total = total + predict_probabilities(model, split.images, batch_size).astype(np.float64)
        del split
    return averaged_result(total / (len(members) + len(computed)), labels)
