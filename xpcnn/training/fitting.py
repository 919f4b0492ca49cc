"""The one-call entry points: ``fit`` a model on a dataset or on arrays, ``evaluate`` it, ``save`` it.

Arrays: images of shape (N, H, W) or (N, 1, H, W), either uint8 in 0..255 or floats in
0..1; labels (N,) integers in 0..K-1, K the model's number of outputs.  ``fit`` normalises
the images to zero mean and unit variance with the training images' statistics, as
``xpcnn train`` does, and returns that normalisation in its :class:`History`:
``evaluate`` needs it to see images as training did.  Both are built on
:class:`xpcnn.training.train.Trainer` and :class:`xpcnn.training.config.TrainConfig`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..backends.backend import Backend, backend_of, get_backend
from ..backends.distributed import Communicator
from ..backends.ranks import join, prepare
from ..base.errors import ConfigError, XpcnnError
from ..data.checkpoint import save_checkpoint
from ..data.data import Dataset, load_dataset
from ..data.device_data import DeviceSplit, EvalResult, Normalization
from ..data.idx import DataError
from ..models import MODELS, build
from ..nn import Sequential
from ..optim import Optimizer
from .config import TrainConfig, make_model, make_optimizer, positive_int
from .display import Progress
from .runs import checkpoint_meta
from .train import RunState, host_splits, start_training
from .train import evaluate as evaluate_split

ARRAYS = "arrays"  # the dataset name fit records for data given as arrays


@dataclass
class History:
    """What :func:`fit` returns: one record per epoch, and what a later evaluate or save needs."""

    records: list[dict]  # per epoch: train_loss, train_accuracy, [val_/test_]loss and _accuracy, lr, seconds, ...
    normalization: Normalization  # the inputs' mean and std, in [0, 1] units
    config: TrainConfig
    optimizer: Optimizer
    state: RunState
    dataset: Dataset  # for arrays: named "arrays", classes "0".."K-1", with no test split and no files


def fit(
    model: Sequential | str,
    data: str | tuple,
    *,
    validation: int | float | tuple = 0,
    callbacks: Sequence = (),
    optimizer: str | Optimizer = "sgd",
    backend: str | Backend = "auto",
    data_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    communicator: Communicator | None = None,
    **settings,
) -> History:
    """Train ``model`` on ``data`` and return its :class:`History`.

    ``model``: a :class:`~xpcnn.nn.Sequential` (trained in place, moved to ``backend``) or a
    model name (``"convnet"``, see :data:`xpcnn.models.MODELS`).  ``data``: a dataset name
    (``"mnist"``, ``"fashion-mnist"``; found as ``xpcnn train`` finds it, in ``data_dir`` first,
    and evaluated on its test split after each epoch) or a pair ``(images, labels)`` of arrays.
    ``validation``: a count or fraction of the training data to hold out, or a pair
    ``(images, labels)``; evaluated after each epoch.  ``callbacks``: objects with
    ``on_step(step, loss)`` and/or ``on_epoch_end(record)``; returning True stops training.
    ``optimizer``: a name (``"sgd"``, ``"adam"``, ``"adamw"``) or an optimiser over ``model``.
    ``settings``: any other :class:`~xpcnn.training.config.TrainConfig` field (``epochs``, ``batch_size``,
    ``lr``, ``schedule``, ``momentum``, ``weight_decay``, ``seed``, ``augment``, ...).
    ``verbose`` prints one line per epoch to stderr.
    ``communicator``: the ranks to train with (:mod:`xpcnn.backends.distributed`); by default the ones the
    environment names (a process started by torchrun, mpiexec, srun or ``xpcnn train --nproc``), else
    this process alone.  Every rank then calls ``fit`` alike and gets the same model and history
    (``batch_size`` is the global batch); see docs/distributed.md.
    """
    if "model" in settings or "dataset" in settings:
        raise ConfigError("give the model and the data as fit's first two arguments, not as settings")
    if not isinstance(optimizer, str | Optimizer):
        raise ConfigError(f"optimizer must be a name or an xpcnn optimiser, got {type(optimizer).__name__}")
    name = model if isinstance(model, str) else _model_name(model)
    config = TrainConfig.from_dict(
        {
            **settings,
            "model": name or TrainConfig.model,
            **({"optimizer": optimizer} if isinstance(optimizer, str) else {}),
            "dataset": data if isinstance(data, str) else ARRAYS,
            "validation": 0 if isinstance(validation, tuple | list) else validation,
        }
    )
    if isinstance(model, str):
        model = make_model(config)
    elif config.dropout is not None:
        raise ConfigError("dropout applies to a model given by name: set your model's Dropout layers' p", "dropout")
    dataset, train, evals = _training_data(data, validation, model, config.seed, data_dir)
    if not isinstance(backend, Backend):
        prepare(backend)  # several JAX ranks meet before JAX does anything
        backend = get_backend(backend)
    model.to(backend)
    for what, (images, _) in [
        ("the training images", train),
        *((f"the {name} images", s) for name, s in evals.items()),
    ]:
        _check_takes(model, images, what)  # before the first epoch, not at its end
    if isinstance(optimizer, Optimizer):
        if optimizer.model is not model:
            raise ConfigError("the optimiser given to fit() must be over the model given to fit()", "optimizer")
        if config.ema:
            raise ConfigError("ema applies to an optimiser given by name: give yours ema=", "ema")
    else:
        optimizer = make_optimizer(config, model)
    communicator = communicator or join(backend)
    norm = Normalization.of(train[0])
    with backend.activate():
        progress = Progress(sys.stderr if verbose else None)
        trainer, train_split, eval_splits = start_training(
            model,
            optimizer,
            backend,
            config,
            norm,
            train,
            evals,
            progress=progress,
            callbacks=callbacks,
            communicator=communicator,
        )
        state = trainer.fit(train_split, eval_splits)
    return History(state.history, norm, config, optimizer, state, dataset)


def evaluate(model: Sequential, images, labels, *, normalization: Normalization, batch_size: int = 1000) -> EvalResult:
    """Mean loss, accuracy and predictions (host (N,) int64) of ``model`` on arrays, in evaluation mode.

    ``images`` and ``labels`` as for :func:`fit`; ``normalization`` is the one ``fit`` trained
    with (``history.normalization``), or a checkpoint's.  Runs on the backend of the model's parameters.
    """
    batch_size = positive_int("batch_size", batch_size)
    if not isinstance(normalization, Normalization):
        raise ConfigError(f"normalization must be an xpcnn Normalization, got {type(normalization).__name__}")
    outputs = _outputs(model)
    images, labels = _checked_arrays(images, labels, outputs, "evaluate's data")
    _check_takes(model, images, "evaluate's data")
    backend = _backend(model)
    with backend.activate():
        return evaluate_split(model, DeviceSplit.from_host(backend, images, labels, normalization), backend, batch_size)


def require_named_dataset(config: TrainConfig, run) -> None:
    """DataError for a run :func:`fit` trained on arrays (``run`` names it): the command line cannot load them."""
    if config.dataset == ARRAYS:
        raise DataError(f"{run} was trained by xpcnn.fit on arrays, not on a dataset's files: use it from Python")


def save(path: str | os.PathLike, model: Sequential, history: History) -> None:
    """Write a checkpoint of ``model`` and its optimiser (atomically) that :mod:`xpcnn.data.checkpoint` reads.

    For a named architecture (trained from a model name, or built by :func:`xpcnn.models.build`)
    the command line's ``xpcnn predict``, ``export`` and ``serve`` read it too, and ``xpcnn evaluate`` where it
    was trained on a named dataset.
    """
    meta = checkpoint_meta(history.config, history.state, history.normalization, history.dataset, _backend(model))
    save_checkpoint(path, meta, model.state_dict(), history.optimizer.state_dict())


def _backend(model: Sequential) -> Backend:
    """The backend of the model's parameters (NumPy for a model without any)."""
    first = next(model.parameters(), None)
    return backend_of(first) if first is not None else get_backend("numpy")


# ---------------------------------------------------------------- data


def _training_data(data, validation, model: Sequential, seed: int, data_dir) -> tuple:
    """(dataset, (train images, labels), {split: (images, labels)}) on the host, checked."""
    outputs = _outputs(model)
    if isinstance(data, str):
        dataset = load_dataset(data, data_dir)
        if outputs is not None and outputs != len(dataset.classes):
            raise XpcnnError(f"the model has {outputs} outputs but {data} has {len(dataset.classes)} classes")
        images, labels = dataset.train_images, dataset.train_labels
        test = (dataset.test_images, dataset.test_labels)
    else:
        if not (isinstance(data, tuple | list) and len(data) == 2):
            raise XpcnnError(
                "fit's data must be a dataset name ('mnist', 'fashion-mnist') or a pair (images, labels) of arrays"
            )
        images, labels = _checked_arrays(*data, outputs, "fit's data")
        classes = tuple(str(k) for k in range(outputs or int(labels.max()) + 1))
        dataset = Dataset(ARRAYS, classes, images, labels, images[:0], labels[:0])
        test = None
    if isinstance(validation, tuple | list):
        validation = _checked_arrays(*validation, len(dataset.classes), "the validation data")
    train, evals = host_splits(images, labels, validation, seed, test)
    return dataset, train, evals


def _checked_arrays(images, labels, classes: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, H, W) uint8 or float32, labels as (N,) int64; XpcnnError naming ``what`` otherwise."""
    images, labels = np.asarray(images), np.asarray(labels)
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[1] == 1)) or images.shape[0] == 0:
        raise XpcnnError(f"{what}: images must have shape (N, H, W) or (N, 1, H, W) with N >= 1, got {images.shape}")
    images = images.reshape(images.shape[0], *images.shape[-2:])
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise XpcnnError(f"{what}: images must be uint8 (0..255) or floats (0..1), got dtype {images.dtype}")
    if images.dtype.kind == "f":
        low, high = float(images.min()), float(images.max())
        if not 0.0 <= low <= high <= 1.0:  # also false for NaN
            raise XpcnnError(f"{what}: float images must lie in [0, 1], got values in [{low}, {high}]")
        images = images.astype(np.float32, copy=False)
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise XpcnnError(
            f"{what}: labels must be {images.shape[0]} integers, one per image, got shape {labels.shape} "
            f"of dtype {labels.dtype}"
        )
    low, high = int(labels.min()), int(labels.max())
    top = f"{classes - 1}" if classes is not None else "K-1"
    if low < 0 or (classes is not None and high >= classes):
        raise XpcnnError(f"{what}: labels must lie in [0, {top}] (the model's outputs), got values in [{low}, {high}]")
    return images, labels.astype(np.int64, copy=False)


def _check_takes(model: Sequential, images: np.ndarray, what: str) -> None:
    """XpcnnError naming ``what`` unless ``model`` takes images of the shape of ``images`` (N, H, W)."""
    try:
        model.output_shapes((1, *images.shape[1:]))
    except ValueError as exc:
        raise XpcnnError(f"{what}: the model does not take images of shape {images.shape[1:]}: {exc}") from None


def _outputs(model: Sequential) -> int | None:
    """The number of classes the model predicts: its last layer's outputs, if it is a Linear layer."""
    return getattr(model[-1], "out_features", None) if len(model) else None


def _model_name(model: Sequential) -> str | None:
    """The name of the named architecture ``model`` is an instance of, if any (recorded in checkpoints)."""
    if not isinstance(model, Sequential):
        raise ConfigError(f"model must be an xpcnn.nn.Sequential or a model name, got {type(model).__name__}")
    return next((name for name in MODELS if repr(build(name)) == repr(model)), None)
