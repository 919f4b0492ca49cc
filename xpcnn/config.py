"""What a training run computes: ``TrainConfig``, and the optimiser and augmentation it names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .augment import Augmentation
from .errors import ConfigError
from .models import MODELS
from .nn import Sequential
from .optim import OPTIMIZERS, SCHEDULES, SGD, Adam, Optimizer


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes."""

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
    validation: int = 0
    augment: bool = False
    elastic: float = 0.0
    elastic_sigma: float = 4.0
    label_smoothing: float = 0.0
    recalibrate_bn: bool = False
    log_every: int = 50

    def __post_init__(self):
        checks = [  # (holds, the setting, what it must be)
            (self.model in MODELS, "model", f"unknown model {self.model!r}: expected one of {', '.join(MODELS)}"),
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
                self.lr > 0 and math.isfinite(self.lr),
                "lr",
                f"learning rate must be a positive number, got {self.lr}",
            ),
            (0 <= self.momentum < 1, "momentum", f"momentum must be in [0, 1), got {self.momentum}"),
            (
                0 <= self.weight_decay < math.inf,
                "weight_decay",
                f"weight decay must be a number >= 0, got {self.weight_decay}",
            ),
            (self.seed >= 0, "seed", f"seed must be >= 0, got {self.seed}"),
            (self.validation >= 0, "validation", f"validation size must be >= 0, got {self.validation}"),
            (self.log_every >= 1, "log_every", f"log interval must be >= 1, got {self.log_every}"),
            (
                0 <= self.label_smoothing < 1,
                "label_smoothing",
                f"label smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (
                0 <= self.elastic < math.inf,
                "elastic",
                f"elastic distortion scale must be a number >= 0, got {self.elastic}",
            ),
            (
                0 < self.elastic_sigma < math.inf,
                "elastic_sigma",
                f"elastic sigma must be a positive number, got {self.elastic_sigma}",
            ),
        ]
        for ok, setting, message in checks:
            if not ok:
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


def make_optimizer(config: TrainConfig, model: Sequential) -> Optimizer:
    """The optimiser named by the config, over ``model``'s parameters."""
    if config.optimizer == "sgd":
        return SGD(
            model, config.lr, momentum=config.momentum, nesterov=config.momentum > 0, weight_decay=config.weight_decay
        )
    kind: type[Adam] = OPTIMIZERS[config.optimizer]
    return kind(model, config.lr, weight_decay=config.weight_decay)


def make_augmentation(config: TrainConfig) -> Augmentation | None:
    """The training-time augmentation the config asks for: affine (``augment``), elastic, both or none."""
    if not config.augment and not config.elastic:
        return None
    affine = {} if config.augment else {"max_shift": 0, "max_rotation": 0, "max_scale": 0, "max_shear": 0}
    return Augmentation(**affine, elastic_alpha=config.elastic, elastic_sigma=config.elastic_sigma)
