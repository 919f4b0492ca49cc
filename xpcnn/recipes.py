"""Named training recipes: settings chosen on a validation split, never on the test set.

A recipe is a set of :class:`xpcnn.config.TrainConfig` values; flags given on
the command line override it.  How each was chosen, and what it reaches, is in
``docs/results.md``.
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
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
    # The most accurate single model we can train: >= 99.6% on MNIST.
    "best": {
        "model": "deepnet",
        "epochs": 15,
        "batch_size": 64,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "augment": True,
        "recalibrate_bn": True,
    },
}


def recipe(name: str) -> dict:
    """The configuration values of recipe ``name``."""
    try:
        return dict(RECIPES[name])
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}") from None
