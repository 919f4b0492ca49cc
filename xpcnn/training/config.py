"""What a training run computes: ``TrainConfig``, the optimiser and augmentation it names, and the named recipes."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import numbers
import sys
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from ..backends.backend import BACKEND_NAMES, cuda_problem
from ..base.errors import ConfigError
from ..data.augment import ELASTIC_SIGMA, MAX_ELASTIC, Augmentation
from ..models import MODELS, build
from ..nn import BatchNorm1d, BatchNorm2d, Dropout, Sequential
from ..optim import MIN_LR, OPTIMIZERS, SGD, Adam, Optimizer
from .schedules import SCHEDULES

MAX_CROP = 14  # pixels of padding: a larger shift leaves less than half of a 28-pixel image
CUSTOM_MODEL = "custom"  # the model name fit records for a model of the user's own layers, which no name rebuilds


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes.

    Checked when made, for the command line and the library alike: each value's type (an integer
    setting takes an integer, not 1.5, "2" or True) and range; ConfigError names the setting.
    """

    dataset: str = "mnist"
    model: str = "convnet"
    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    seed: int = 0
    validation: int | float = 0  # a count of training images, or a fraction in (0, 1) of them
    augment: bool = False
    elastic: float = 0.0
    elastic_sigma: float = 4.0
    flip: bool = False  # mirror each training image left to right with probability 1/2 (clothing, not digits)
    crop: int = 0  # pad each training image by this many pixels of background, crop back at a random offset
    erase: float = 0.0  # the probability that a training image has a random rectangle set to the background
    label_smoothing: float = 0.0
    dropout: float | None = None  # every dropout layer's probability; None keeps the model's own
    ema: float = 0.0  # the decay of a moving average of the weights, evaluated and kept (0: none)
    recalibrate_bn: bool = False
    log_every: int = 50

    def __post_init__(self):
        for field in dataclasses.fields(self):
            setattr(self, field.name, _typed(field.name, field.type, getattr(self, field.name)))
        low, high = ELASTIC_SIGMA
        checks = [  # (holds, the setting, what it must be)
            (
                self.model in MODELS or self.model == CUSTOM_MODEL,
                "model",
                f"unknown model {self.model!r}: expected one of {', '.join(MODELS)}",
            ),
            (
                self.optimizer in OPTIMIZERS,
                "optimizer",
                f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}",
            ),
            (
                self.schedule in SCHEDULES,
                "schedule",
                f"unknown schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}",
            ),
            (self.epochs >= 1, "epochs", f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, "batch_size", f"batch size must be >= 1, got {self.batch_size}"),
            (
                MIN_LR <= self.lr < math.inf,
                "lr",
                f"learning rate must be a positive number of at least {MIN_LR:.3g} (float32's least), got {self.lr}",
            ),
            (0 <= self.momentum < 1, "momentum", f"momentum must be in [0, 1), got {self.momentum}"),
            (
                0 <= self.weight_decay < math.inf,
                "weight_decay",
                f"weight decay must be a number >= 0, got {self.weight_decay}",
            ),
            (self.seed >= 0, "seed", f"seed must be >= 0, got {self.seed}"),
            (
                self.validation >= 0 and (isinstance(self.validation, int) or self.validation < 1),
                "validation",
                f"validation must be a count >= 0 or a fraction in (0, 1), got {self.validation}",
            ),
            (self.log_every >= 1, "log_every", f"log interval must be >= 1, got {self.log_every}"),
            (
                0 <= self.label_smoothing < 1,
                "label_smoothing",
                f"label smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (
                0 <= self.elastic <= MAX_ELASTIC,
                "elastic",
                f"elastic distortion scale must be in [0, {MAX_ELASTIC:g}] pixels, got {self.elastic}",
            ),
            (
                0 <= self.crop <= MAX_CROP,
                "crop",
                f"crop padding must be in [0, {MAX_CROP}] pixels, got {self.crop}",
            ),
            (0 <= self.erase <= 1, "erase", f"erase must be a probability in [0, 1], got {self.erase}"),
            (
                self.dropout is None or 0 <= self.dropout < 1,
                "dropout",
                f"dropout must be a probability in [0, 1), got {self.dropout}",
            ),
            (
                not self.dropout or self.model not in MODELS or _has_dropout(self.model),
                "dropout",
                f"dropout {self.dropout} asked for, but model {self.model} has no dropout layer",
            ),
            (0 <= self.ema < 1, "ema", f"ema must be a decay in [0, 1), got {self.ema}"),
            (
                low <= self.elastic_sigma <= high,
                "elastic_sigma",
                f"elastic sigma must be in [{low:g}, {high:g}] pixels, got {self.elastic_sigma}",
            ),
        ]
        for ok, setting, message in checks:
            if not ok:
                raise ConfigError(message, setting)

    def check_every_setting_used(self, model: Sequential | None = None, given: Collection[str] = ()) -> None:
        """ConfigError for a setting named in ``given`` (the command line's flags, fit's keywords) that a new run of
        ``model`` (default: the named one) would drop: its weights would come out as without it.

        A recipe's settings are not the user's: ``--recipe best --model convnet`` trains, without recalibration.
        Not made part of every config's check: checkpoints of runs that gave such settings before are still read.
        """
        batch_norm = (
            has_batch_norm(model) if model is not None else self.model not in MODELS or model_has_batch_norm(self.model)
        )
        unused = [
            (
                self.optimizer == "sgd",
                "momentum",
                f"momentum {self.momentum} is SGD's: {self.optimizer} has moment decays of its own",
            ),
            (
                not self.recalibrate_bn or batch_norm,
                "recalibrate_bn",
                f"batch-norm recalibration asked for, but model {self.model} has no batch-norm layer",
            ),
            (
                self.elastic > 0,
                "elastic_sigma",
                f"elastic sigma {self.elastic_sigma} given without an elastic distortion (--elastic ALPHA)",
            ),
        ]
        for ok, setting, message in unused:
            if setting in given and not ok:
                raise ConfigError(message, setting)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag(setting: str) -> str:
    """The command line's flag of a setting (a TrainConfig field, or another a ConfigError names): ``log_every``
    -> ``--log-every``."""
    return "--" + setting.replace("_", "-")


def require_named_model(config: TrainConfig, where) -> None:
    """ConfigError where ``config`` (of the run or checkpoint ``where``) records a model of the user's own layers:
    only the user's code can build it again."""
    if config.model == CUSTOM_MODEL:  # no setting named: the commands that read checkpoints have no --model
        raise ConfigError(
            f"{where} holds a model of your own layers (trained by xpcnn.fit), which only your code can build again: "
            "build it and load the checkpoint's model_state into it"
        )


def make_model(config: TrainConfig) -> Sequential:
    """The config's named model with weights drawn from its seed, every dropout layer at the config's ``dropout``
    where it names one; ConfigError for a model of the user's own layers."""
    require_named_model(config, "the configuration")
    model = build(config.model, seed=config.seed)
    if config.dropout is not None:
        for layer in _dropout_layers(model):
            layer.p = config.dropout
    return model


def _dropout_layers(model: Sequential) -> list[Dropout]:
    return [layer for layer in model.modules() if isinstance(layer, Dropout)]


@functools.cache
def _has_dropout(name: str) -> bool:
    """Whether the named model has a dropout layer for a nonzero ``dropout`` setting to change."""
    return bool(_dropout_layers(build(name)))


@functools.cache
def model_has_batch_norm(name: str) -> bool:
    """Whether the model named ``name`` (one of ``MODELS``) has a batch-norm layer for ``recalibrate_bn`` to
    re-estimate."""
    return has_batch_norm(build(name))


def has_batch_norm(model: Sequential) -> bool:
    """Whether ``model`` has a batch-norm layer (for ``recalibrate_bn`` to re-estimate)."""
    return any(isinstance(layer, BatchNorm1d | BatchNorm2d) for layer in model.modules())


def make_optimizer(config: TrainConfig, model: Sequential) -> Optimizer:
    """The optimiser named by the config, over ``model``'s parameters."""
    if config.optimizer == "sgd":
        return SGD(
            model,
            config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
            ema=config.ema,
        )
    kind: type[Adam] = OPTIMIZERS[config.optimizer]
    return kind(model, config.lr, weight_decay=config.weight_decay, ema=config.ema)


def make_augmentation(config: TrainConfig) -> Augmentation | None:
    """The training-time augmentation the config asks for: affine (``augment``), elastic, flips, crops,
    erasing, any of them together (the warp first, erasing last), or none."""
    if not (config.augment or config.elastic or config.flip or config.crop or config.erase):
        return None
    affine = {} if config.augment else {"max_shift": 0, "max_rotation": 0, "max_scale": 0, "max_shear": 0}
    return Augmentation(
        **affine,
        elastic_alpha=config.elastic,
        elastic_sigma=config.elastic_sigma,
        flip=config.flip,
        crop=config.crop,
        erase=config.erase,
    )


def _typed(name: str, kind: str, value):
    """``value`` as the setting ``name`` of annotation ``kind`` takes it (NumPy scalars become Python's);
    ConfigError naming the setting where it is of another type.  bool is not a number here."""
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    # Beyond a float's range: float() of it overflows, and a checkpoint recording it could not be read back.
    if integer and abs(int(value)) > sys.float_info.max:
        raise ConfigError(f"{name} is too large, got an integer of {int(value).bit_length()} bits", name)
    if kind == "int" and integer:
        return int(value)
    if kind == "float" and real:
        return float(value)
    if kind == "int | float" and real:
        return int(value) if integer else float(value)
    if kind == "float | None" and (real or value is None):
        return None if value is None else float(value)
    if kind == "bool" and isinstance(value, bool | np.bool_):
        return bool(value)
    if kind == "str" and isinstance(value, str):
        return value
    expected = {
        "int": "an integer",
        "float": "a number",
        "int | float": "a number",
        "float | None": "a number or None",
        "bool": "True or False",
    }
    raise ConfigError(f"{name} must be {expected.get(kind, 'a string')}, got {value!r}", name)


def positive_int(name: str, value) -> int:
    """A setting outside ``TrainConfig`` that counts something (``evaluate``'s ``batch_size``), checked as it is."""
    value = _typed(name, "int", value)
    if value < 1:
        raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {value}", name)
    return value


# Named training recipes: settings chosen on a validation split, never on the test set.  A recipe is a set of
# TrainConfig values; flags given on the command line override it.  How each was chosen, and what it reaches,
# is in docs/results.md.
RECIPES: dict[str, dict] = {
    # >= 99.0% test accuracy in the fewest seconds on a laptop's CPU (on JAX's compiled steps where installed).
    "quick": {
        "model": "lenet-bn",
        "epochs": 2,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "schedule": "onecycle",
    },
    # >= 99.0% test accuracy in as little training as possible.
    "fast": {
        "model": "convnet-bn",
        "epochs": 2,
        "batch_size": 64,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "schedule": "onecycle",
    },
    # Fashion-MNIST: clothing gets flips and crops, not rotations; 18-20 minutes of training on 2 cores of an AMD EPYC,
    # where its 30-minute limit was measured, nearer 45 on the slower 2-core Xeon of earlier rounds (docs/results.md).
    "fashion": {
        "dataset": "fashion-mnist",
        "model": "resnet-wide",
        "epochs": 30,
        "batch_size": 64,
        "optimizer": "sgd",
        "lr": 0.025,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "flip": True,
        "crop": 2,
        "dropout": 0.0,
    },
    # The most accurate single model we can train on MNIST (docs/results.md).
    "best": {
        "model": "resnet-small",
        "epochs": 20,
        "batch_size": 64,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "augment": True,
        "recalibrate_bn": True,
        "label_smoothing": 0.1,
        "dropout": 0.0,
    },
}


# The backend a recipe's seconds were measured on, taken on the CPU when the command line names none.
RECIPE_BACKENDS = {"quick": "jax", "fashion": "jax", "best": "jax"}


def recipe_backend(name: str | None, device: str | None) -> tuple[str | None, str | None]:
    """The backend a run of recipe ``name`` on ``device`` takes when none is named (None for the default), and
    the one it would take were it installed (None unless it is missing).

    A recipe's preferred backend (``RECIPE_BACKENDS``) is taken only on the CPU (``device`` "cpu", or "auto"
    without a usable GPU) and only where it is installed; on a GPU, or without it, the default backend.
    """
    preferred = RECIPE_BACKENDS.get(name or "")
    if preferred is None:
        return None, None
    on_cpu = device == "cpu" or (device in (None, "auto") and cuda_problem() is not None)
    if not on_cpu:
        return None, None
    if importlib.util.find_spec(preferred) is None:
        return None, preferred
    return preferred, None


def resumed_backend(trained_on: str, device: str | None) -> tuple[str | None, str | None]:
    """The backend a resumed run continues on when the command line names none (None for the default), and
    the one it trained on where that cannot run here (None unless so).

    ``trained_on`` is its checkpoint's "jax on cpu" or "cupy on cuda:0 (...)": the run continues on that backend
    (a JAX run continues exactly only on JAX) where it is installed and ``device`` is "auto" or of its kind, the
    CPU or CUDA; on another ``device``, on that device's default.
    """
    name, _, where = trained_on.partition(" on ")
    kind = "cuda" if where.startswith("cuda") else "cpu"
    if name not in BACKEND_NAMES or (device not in (None, "auto") and not device.startswith(kind)):
        return None, None
    if importlib.util.find_spec(name.replace("-", "_")) is None or (kind == "cuda" and cuda_problem() is not None):
        return None, name
    return name, None


def preferred_backend(recipe_name: str | None, trained_on: str, device: str | None) -> tuple[str | None, str | None]:
    """:func:`resumed_backend` for a resumed run (``trained_on`` its checkpoint's), else :func:`recipe_backend`."""
    return resumed_backend(trained_on, device) if trained_on else recipe_backend(recipe_name, device)


def recipe_dataset(name: str) -> str:
    """The dataset recipe ``name`` was chosen on: the one it names, else the default dataset."""
    return recipe(name).get("dataset", TrainConfig.dataset)


def recipes_for(dataset: str) -> list[str]:
    """The recipes chosen on ``dataset``, in ``RECIPES``' order."""
    return [name for name in RECIPES if recipe_dataset(name) == dataset]


def recipe(name: str) -> dict:
    """The configuration values of recipe ``name``."""
    try:
        return dict(RECIPES[name])
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}") from None
