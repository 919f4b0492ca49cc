"""The one-call entry points: ``fit`` a model on a dataset or on arrays, ``evaluate`` it, ``save`` it.

Arrays: images of shape (N, H, W) or (N, 1, H, W), either uint8 in 0..255 or floats in
0..1; labels (N,) integers in 0..K-1, K the model's number of outputs.  ``fit`` normalises
the images to zero mean and unit variance with the training images' statistics, as
``xpcnn train`` does, and returns that normalisation in its :class:`History`:
``evaluate`` needs it to see images as training did.  Both are built on
:class:`xpcnn.training.train.Trainer` and :class:`xpcnn.training.config.TrainConfig`.
"""

from __future__ import annotations

import contextlib
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
from ..data.data import IMAGE_SIZE, Dataset, load_dataset
from ..data.device_data import DeviceSplit, EvalResult, Normalization, input_dtype
from ..data.idx import DataError
from ..models import MODELS, build
from ..nn import Sequential
from ..optim import OPTIMIZERS, SGD, Optimizer
from .config import CUSTOM_MODEL, TrainConfig, make_model, make_optimizer, positive_int, require_named_model
from .display import Progress
from .runs import checkpoint_meta
from .step import stateless_forward
from .train import RunState, host_splits, predict_probabilities, start_training
from .train import evaluate as evaluate_split

ARRAYS = "arrays"  # the dataset name fit records for data given as arrays
OWN_SETTINGS = ("lr", "momentum", "weight_decay", "ema")  # what an optimiser given to fit holds itself


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
    callbacks: Sequence | None = (),
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
    ``on_step(step, loss)`` and/or ``on_epoch_end(record)``; returning True stops training (None: none).
    ``optimizer``: a name (``"sgd"``, ``"adam"``, ``"adamw"``) or an optimiser over ``model``; a given one's
    own lr is the peak the schedule scales, and ``lr``, ``momentum``, ``weight_decay`` and ``ema`` beside
    it are refused.  Either way the optimiser's lr is its peak again when ``fit`` returns.
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
    if isinstance(model, str) and model not in MODELS:  # "custom" included: a checkpoint's record, not a model
        raise ConfigError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}", "model")
    name = model if isinstance(model, str) else _model_name(model)
    own = _optimizer_settings(optimizer, settings) if isinstance(optimizer, Optimizer) else {"optimizer": optimizer}
    config = TrainConfig.from_dict(
        {
            **settings,
            "model": name or CUSTOM_MODEL,
            **own,
            "dataset": data if isinstance(data, str) else ARRAYS,
            "validation": 0 if isinstance(validation, tuple | list) else validation,
        }
    )
    if isinstance(model, str):
        model = make_model(config)
    elif config.dropout is not None:
        raise ConfigError("dropout applies to a model given by name: set your model's Dropout layers' p", "dropout")
    config.check_every_setting_used(model, given=settings)
    dataset, train, evals = _training_data(data, validation, model, config.seed, data_dir)
    if name is not None and train[0].shape[1:] != IMAGE_SIZE:  # the commands give a named model 28x28 pictures
        height, width = train[0].shape[1:]
        message = f"{name} is made for 28x28 images, not {height}x{width}: build a model of your own layers for those"
        raise ConfigError(message, "model")
    if not isinstance(backend, Backend):
        prepare(backend)  # several JAX ranks meet before JAX does anything
        backend = get_backend(backend)
    model.to(backend)
    for split, (images, _) in evals.items():
        _outputs(model, images, f"the {split} images")  # before the first epoch, not at its end
    if isinstance(optimizer, Optimizer):
        if optimizer.model is not model:
            raise ConfigError("the optimiser given to fit() must be over the model given to fit()", "optimizer")
    else:
        optimizer = make_optimizer(config, model)
    communicator = communicator or join(backend)
    norm = Normalization.of(train[0])
    with backend.activate(), _lr_restored(optimizer):
        if communicator.world_size == 1:  # several ranks' batch norm sees the global batch: never a batch of one
            _check_batch_of_one(model, backend, train[0], config.batch_size)
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
            callbacks=callbacks or (),
            communicator=communicator,
        )
        state = trainer.fit(train_split, eval_splits)
    return History(state.history, norm, config, optimizer, state, dataset)


def evaluate(model: Sequential, images, labels, *, normalization: Normalization, batch_size: int = 1000) -> EvalResult:
    """Mean loss, accuracy and predictions (host (N,) int64) of ``model`` on arrays, in evaluation mode.

    ``images`` and ``labels`` as for :func:`fit`; ``normalization`` is the one ``fit`` trained
    with (``history.normalization``), or a checkpoint's.  Runs on the backend of the model's parameters.
    """
    batch_size = _inference_settings(normalization, batch_size)
    images, labels = _checked_arrays(images, labels, "evaluate's data")
    _check_labels(labels, _outputs(model, images, "evaluate's data"), "evaluate's data")
    backend = _backend(model)
    with backend.activate():
        split = DeviceSplit.from_host(backend, images, labels, normalization, input_dtype(model))
        return evaluate_split(model, split, backend, batch_size)


def predict(model: Sequential, images, *, normalization: Normalization, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, K) float32 on the host for ``images`` as for :func:`fit`, or one image (H, W), in
    evaluation mode: Keras' ``model.predict`` with the softmax.  ``normalization`` as for :func:`evaluate`."""
    batch_size = _inference_settings(normalization, batch_size)
    images = np.asarray(images)
    images = _checked_images(images[None] if images.ndim == 2 else images, "predict's images")
    _outputs(model, images, "predict's images")
    backend = _backend(model)
    with backend.activate():
        unlabelled = np.zeros(len(images), np.int64)  # from_host converts the images as evaluate's are; no labels
        split = DeviceSplit.from_host(backend, images, unlabelled, normalization, input_dtype(model))
        return predict_probabilities(model, split.images, batch_size)


def require_rebuildable_run(config: TrainConfig, run) -> None:
    """ConfigError for a run of a model of the user's own layers, DataError for one :func:`fit` trained on arrays
    (``run`` names it): the command line can build neither again."""
    require_named_model(config, run)
    if config.dataset == ARRAYS:
        raise DataError(f"{run} was trained by xpcnn.fit on arrays, not on a dataset's files: use it from Python")


def save(path: str | os.PathLike, model: Sequential, history: History) -> None:
    """Write a checkpoint of ``model`` and its optimiser (atomically) that :mod:`xpcnn.data.checkpoint` reads.

    For a named architecture (trained from a model name, or built by :func:`xpcnn.models.build`)
    the command line's ``xpcnn predict``, ``export`` and ``serve`` read it too, and ``xpcnn evaluate`` where it
    was trained on a named dataset; a model of your own layers is recorded as ``"custom"``, which only your code
    builds again.  ``model`` must be the one ``fit`` trained for ``history`` (or one of the same
    layers); ConfigError, before anything is written, otherwise.
    """
    if not isinstance(history, History):
        raise ConfigError(f"history must be the History fit returned, got {type(history).__name__}")
    if not isinstance(model, Sequential) or repr(model) != repr(history.optimizer.model):
        trained = _model_name(history.optimizer.model) or "a model of your own layers"
        raise ConfigError(f"the model is not the one history trained ({trained}): give save the model fit trained")
    meta = checkpoint_meta(history.config, history.state, history.normalization, history.dataset, _backend(model))
    save_checkpoint(path, meta, model.state_dict(), history.optimizer.state_dict())


def _inference_settings(normalization: Normalization, batch_size: int) -> int:
    """``batch_size`` checked, for :func:`evaluate` and :func:`predict`; ConfigError unless ``normalization`` is
    an xpcnn Normalization."""
    batch_size = positive_int("batch_size", batch_size)
    if not isinstance(normalization, Normalization):
        raise ConfigError(f"normalization must be an xpcnn Normalization, got {type(normalization).__name__}")
    return batch_size


def _backend(model: Sequential) -> Backend:
    """The backend of the model's parameters (NumPy for a model without any)."""
    first = next(model.parameters(), None)
    return backend_of(first) if first is not None else get_backend("numpy")


# ---------------------------------------------------------------- the optimiser


def _optimizer_settings(optimizer: Optimizer, settings: dict) -> dict:
    """The TrainConfig settings an optimiser given to fit holds (its kind, lr, momentum, weight decay, ema), for
    the history to record what trained; ConfigError where one of them is given beside it as well."""
    for setting in OWN_SETTINGS:
        if setting in settings:
            message = f"{setting} applies to an optimiser given by name: give yours {setting}= when you make it"
            raise ConfigError(message, setting)
    kind = next((name for cls in type(optimizer).__mro__ for name, k in OPTIMIZERS.items() if cls is k), None)
    if kind is None:
        name = type(optimizer).__name__
        message = f"fit records the optimiser it trains with: give it an SGD, Adam or AdamW optimiser, not a {name}"
        raise ConfigError(message, "optimizer")
    own = {"optimizer": kind, "lr": optimizer.lr, "weight_decay": optimizer.weight_decay, "ema": optimizer.ema}
    return {**own, "momentum": optimizer.momentum} if isinstance(optimizer, SGD) else own


@contextlib.contextmanager
def _lr_restored(optimizer: Optimizer):
    """Inside, the schedule sets ``optimizer.lr`` each step; after, it is the peak it was, so that a later
    fit with the same optimiser schedules from the same peak."""
    peak = optimizer.lr
    try:
        yield
    finally:
        optimizer.lr = peak


# ---------------------------------------------------------------- data


def _training_data(data, validation, model: Sequential, seed: int, data_dir) -> tuple:
    """(dataset, (train images, labels), {split: (images, labels)}) on the host, checked."""
    if isinstance(data, str):
        dataset = load_dataset(data, data_dir)
        outputs = _outputs(model, dataset.train_images, "the training images")
        if outputs != len(dataset.classes):
            raise XpcnnError(f"the model has {outputs} outputs but {data} has {len(dataset.classes)} classes")
        images, labels = dataset.train_images, dataset.train_labels
        test = (dataset.test_images, dataset.test_labels)
    else:
        if not (isinstance(data, tuple | list) and len(data) == 2):
            raise XpcnnError(
                "fit's data must be a dataset name ('mnist', 'fashion-mnist') or a pair (images, labels) of arrays"
            )
        images, labels = _checked_arrays(*data, "fit's data")
        outputs = _outputs(model, images, "the training images")
        _check_labels(labels, outputs, "fit's data")
        classes = tuple(str(k) for k in range(outputs))
        dataset = Dataset(ARRAYS, classes, images, labels, images[:0], labels[:0])
        test = None
    if isinstance(validation, tuple | list):
        if len(validation) != 2:
            message = f"validation must be a count, a fraction or a pair (images, labels), got {len(validation)} arrays"
            raise ConfigError(message, "validation")
        validation = _checked_arrays(*validation, "the validation data")
        _check_labels(validation[1], outputs, "the validation data")
    train, evals = host_splits(images, labels, validation, seed, test)
    return dataset, train, evals


def _checked_arrays(images, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, H, W) uint8 or float32, labels as (N,) int64; XpcnnError naming ``what`` otherwise."""
    images, labels = _checked_images(images, what), np.asarray(labels)
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise XpcnnError(
            f"{what}: labels must be {images.shape[0]} integers, one per image, got shape {labels.shape} "
            f"of dtype {labels.dtype}"
        )
    return images, labels.astype(np.int64, copy=False)


def _checked_images(images, what: str) -> np.ndarray:
    """Images as (N, H, W) uint8 or float32; XpcnnError naming ``what`` otherwise."""
    images = np.asarray(images)
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
    return images


def _check_labels(labels: np.ndarray, classes: int, what: str) -> None:
    """ConfigError naming ``what`` unless every label (N,) lies in 0..classes-1."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        message = f"{what}: labels must lie in [0, {classes - 1}] (the model's outputs), got values in [{low}, {high}]"
        raise ConfigError(message)


def _outputs(model: Sequential, images: np.ndarray, what: str) -> int:
    """The number of classes ``model`` predicts for images of the shape of ``images`` (N, H, W): K of its (N, K)
    output, by its shape inference; XpcnnError naming ``what`` where it does not take them or gives no (N, K)."""
    try:
        shapes = model.output_shapes((1, *images.shape[1:]))
    except ValueError as exc:
        raise XpcnnError(f"{what}: the model does not take images of shape {images.shape[1:]}: {exc}") from None
    shape = shapes[-1] if shapes else (1, 1, *images.shape[1:])
    if len(shape) != 2:
        raise XpcnnError(f"{what}: the model's output has shape {shape[1:]} per image, not one score per class")
    return shape[1]


def _check_batch_of_one(model: Sequential, backend: Backend, images: np.ndarray, batch_size: int) -> None:
    """ConfigError before the first step where an epoch of ``images`` (N, H, W) in batches of ``batch_size`` has a
    batch of one that the model cannot train on (batch norm over one value per channel).  ``xpcnn train`` trains
    on such a batch, as every named model can."""
    n = len(images)
    if (n % batch_size or batch_size) != 1:
        return
    x = backend.asarray(np.zeros((1, 1, *images.shape[1:]), np.float32), input_dtype(model))
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    try:
        stateless_forward(model, parameters, buffers, x, training=True, generator=backend.generator(0))
    except ValueError as exc:
        message = f"{n} training images in batches of {batch_size} give a batch of one, which the model cannot train on"
        raise ConfigError(f"{message} ({exc}): choose another batch_size", "batch_size") from None


def _model_name(model: Sequential) -> str | None:
    """The name of the named architecture ``model`` is an instance of, if any (recorded in checkpoints)."""
    if not isinstance(model, Sequential):
        raise ConfigError(f"model must be an xpcnn.nn.Sequential or a model name, got {type(model).__name__}")
    return next((name for name in MODELS if repr(build(name)) == repr(model)), None)
