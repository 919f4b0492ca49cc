"""This process among the ranks: the engine the environment asks for, started once (:mod:`xpcnn.backends.distributed`).

``prepare(backend_name)`` before the backend is made (JAX's processes must meet before JAX does anything),
``join(backend)`` after: torch.distributed (gloo) for NumPy and torch, jax.distributed for JAX.
"""

from __future__ import annotations

import atexit

from .backend import Backend
from .distributed import Communicator, Local, TorchCommunicator, check_backend, rank_from_environment, timeout_seconds
from .distributed_jax import JaxCommunicator, initialize

_JOINED: Communicator | None = None


def join(backend: Backend) -> Communicator:
    """This process's communicator, from the environment (:func:`rank_from_environment`), made once per process.

    One rank alone gets :class:`Local`; several need ``backend`` to be NumPy, torch or JAX on the CPU
    (:func:`xpcnn.backends.distributed.check_backend`).
    """
    global _JOINED
    placement = rank_from_environment()
    if placement.world_size == 1:
        return Local()
    check_backend(backend, placement.world_size)
    if _JOINED is None and backend.name == "jax":
        _JOINED = JaxCommunicator(placement)
    if _JOINED is None:
        _JOINED = TorchCommunicator(placement, timeout_seconds())
        atexit.register(_JOINED._leave)  # also when the rank ends with an error
    return _JOINED


def prepare(backend_name: str | None) -> None:
    """Before ``backend_name``'s backend is made: JAX's processes must meet before JAX does anything else.

    With several ranks on the jax backend, ``jax.distributed.initialize`` at ``XPCNN_COORDINATOR``
    (host:port of rank 0's coordinator; ``xpcnn train --nproc`` sets it); nothing otherwise.
    """
    placement = rank_from_environment()
    if placement.world_size == 1 or backend_name != "jax":
        return
    initialize(placement, timeout_seconds())
