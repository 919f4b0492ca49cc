"""xpcnn: a convolutional-network trainer written once on the Python Array API.

The layers (:mod:`xpcnn.nn`), optimisers (:mod:`xpcnn.optim`) and models
(:mod:`xpcnn.models`) run on any backend from :func:`get_backend`;
:func:`fit`, :func:`evaluate`, :func:`predict` and :func:`save` (:mod:`xpcnn.training.fitting`) train,
test, use and store a model in one call each.  See docs/library.md.
"""

__version__ = "0.1.0"

from . import models, nn, optim  # noqa: E402
from .backends.backend import get_backend  # noqa: E402
from .training.fitting import History, evaluate, fit, predict, save  # noqa: E402

__all__ = ["History", "__version__", "evaluate", "fit", "get_backend", "models", "nn", "optim", "predict", "save"]
