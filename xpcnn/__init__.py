"""xpcnn: a convolutional-network trainer written once on the Python Array API.

The layers (:mod:`xpcnn.nn`), optimisers (:mod:`xpcnn.optim`) and models
(:mod:`xpcnn.models`) run on any backend from :func:`get_backend`.
"""

__version__ = "0.1.0"

from . import models, nn, optim  # noqa: E402
from .backend import get_backend  # noqa: E402

__all__ = ["__version__", "get_backend", "models", "nn", "optim"]
