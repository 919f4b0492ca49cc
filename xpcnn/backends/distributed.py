"""Data-parallel training's communicator seam: who this process is among the ranks, and its collectives.

A :class:`Communicator` offers what a synchronous data-parallel step needs and nothing more: ``rank``,
``world_size``, :meth:`~Communicator.all_reduce_sum` and :meth:`~Communicator.all_reduce_mean` of an array
(in place), :meth:`~Communicator.broadcast` of an array from rank 0, and :meth:`~Communicator.barrier`.
:class:`Local` is the one-process communicator (every collective a no-op); :class:`TorchCommunicator`
runs the collectives through ``torch.distributed`` (gloo on the CPU) for the NumPy and torch backends:
a NumPy buffer is reduced in place through ``torch.from_numpy``.

Who a process is comes from the environment (:func:`rank_from_environment`): xpcnn's own launcher
(``xpcnn train --nproc N``: ``XPCNN_RANK``, ``XPCNN_WORLD_SIZE``, a file rendezvous in
``XPCNN_RENDEZVOUS``), torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), Open MPI and
MPICH's ``mpiexec`` (``OMPI_COMM_WORLD_RANK``/``_SIZE``, ``PMI_RANK``/``PMI_SIZE``) and SLURM's ``srun``
(``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``).  Every collective gives up after ``XPCNN_DIST_TIMEOUT``
seconds (default :data:`DEFAULT_TIMEOUT`) and a lost rank is a :class:`RankLost`: one line, never a hang.
See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import urllib.parse
from dataclasses import dataclass

from ..base.errors import ConfigError, XpcnnError
from .backend import Backend

DEFAULT_TIMEOUT = 120.0  # seconds a rank waits in one collective for the others
INSTALL = "pip install 'xpcnn[distributed]'"


class DistributedError(XpcnnError):
    """Data-parallel training cannot start here: a missing package, launcher variable or rendezvous."""


class RankLost(XpcnnError):
    """Another rank died or stopped answering during a collective."""


@dataclass(frozen=True)
class Placement:
    """This process's place among the ranks, read from the environment; ``init_method`` is torch's rendezvous URL."""

    rank: int
    world_size: int
    init_method: str | None
    launcher: str


# (launcher, rank variable, world-size variable), tried in this order.
LAUNCHERS = (
    ("xpcnn", "XPCNN_RANK", "XPCNN_WORLD_SIZE"),
    ("torchrun", "RANK", "WORLD_SIZE"),
    ("mpiexec (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mpiexec (MPICH)", "PMI_RANK", "PMI_SIZE"),
    ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
)


MAX_RANKS = 2**31 - 1


def rank_from_environment(environ=None) -> Placement:
    """Where this process stands: the first launcher whose two variables are set, else rank 0 of 1.

    The rendezvous: ``XPCNN_RENDEZVOUS`` (a file every rank can reach, ``file://`` URL or path), else
    ``MASTER_ADDR`` and ``MASTER_PORT`` (torch's ``env://``).  DistributedError on malformed values,
    or for more than one rank with no rendezvous.
    """
    environ = os.environ if environ is None else environ
    for launcher, rank_name, size_name in LAUNCHERS:
        if rank_name in environ and size_name in environ:
            try:
                rank, size = int(environ[rank_name]), int(environ[size_name])
            except ValueError:
                raise DistributedError(
                    f"{launcher}: {rank_name}={environ[rank_name]!r} and {size_name}={environ[size_name]!r} "
                    "must be integers"
                ) from None
            if not 0 <= rank < size:
                raise DistributedError(f"{launcher}: {rank_name}={rank} is not a rank of {size_name}={size}")
            if size > MAX_RANKS:  # torch's and JAX's counts are 32-bit
                raise DistributedError(
                    f"{launcher}: {size_name}={size} is more ranks than the {MAX_RANKS:,} there can be"
                )
            return Placement(rank, size, _init_method(environ, launcher) if size > 1 else None, launcher)
    return Placement(0, 1, None, "none")


def _init_method(environ, launcher: str) -> str | None:
    """torch's rendezvous URL; None for JAX's ranks, which meet at ``XPCNN_COORDINATOR`` and need none."""
    rendezvous = environ.get("XPCNN_RENDEZVOUS")
    if rendezvous:
        return rendezvous if "://" in rendezvous else "file://" + os.path.abspath(rendezvous)
    if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        if not is_port(environ["MASTER_PORT"].strip()):
            raise DistributedError(f"MASTER_PORT must be rank 0's port, 1 to 65535, got {environ['MASTER_PORT']!r}")
        return "env://"
    if environ.get("XPCNN_COORDINATOR"):
        return None
    raise DistributedError(_no_rendezvous(launcher))


def is_port(text: str) -> bool:
    """Whether ``text`` is a TCP port number, 1 to 65535 (ASCII digits: ``int`` also reads others)."""
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def _no_rendezvous(launcher: str) -> str:
    return (
        f"{launcher} started several ranks but named no rendezvous: set MASTER_ADDR and MASTER_PORT "
        "(rank 0's host and a free port) or XPCNN_RENDEZVOUS (a file on a filesystem every rank shares)"
    )


MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 7 * 24 * 3600.0  # XPCNN_DIST_TIMEOUT's range, in seconds


def timeout_seconds(environ=None) -> float:
    """``XPCNN_DIST_TIMEOUT`` (seconds a collective waits for the other ranks), else :data:`DEFAULT_TIMEOUT`."""
    environ = os.environ if environ is None else environ
    text = environ.get("XPCNN_DIST_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not MIN_TIMEOUT <= value <= MAX_TIMEOUT:  # torch reads 0 ms as no timeout at all; a huge one overflows
        raise ConfigError(
            f"XPCNN_DIST_TIMEOUT must be a number of seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g} (a week), "
            f"got {text!r}"
        )
    return value


class Communicator:
    """Rank, world size and the collectives of synchronous data parallelism; this base is one process alone.

    Arrays are 1-d NumPy arrays or torch tensors, contiguous and writeable; reductions and broadcasts
    happen in place and return the array.
    """

    rank = 0
    world_size = 1

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0: the one rank that writes files and shows progress."""
        return self.rank == 0

    def all_reduce_sum(self, array):
        """The element-wise sum of ``array`` over all ranks, into ``array``."""
        return array

    def all_reduce_mean(self, array):
        """The element-wise mean of ``array`` over all ranks, into ``array`` (a sum, then a division)."""
        if self.world_size > 1:
            array = self.all_reduce_sum(array)
            array /= self.world_size  # in place where arrays are writeable
        return array

    def broadcast(self, array):
        """Rank 0's ``array`` on every rank, into ``array``."""
        return array

    def barrier(self) -> None:
        """Return once every rank has called it."""

    def close(self) -> None:
        """End this rank's part once every rank is done: a barrier, then the connections are closed."""

    def failures(self):
        """A context in which the engine's errors of a lost rank become :class:`RankLost` (where they do not
        come from this class's own collectives: a collective inside a compiled step)."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


class Local(Communicator):
    """One process: every collective leaves its array as it is."""


def rendezvous_folder(url: str) -> str:
    """The folder of a ``file://`` rendezvous, read as torch reads it: the URL's path, neither its host
    (``file://localhost/...``) nor decoded."""
    return os.path.dirname(urllib.parse.urlparse(url).path)


class TorchCommunicator(Communicator):
    """The collectives through ``torch.distributed`` with gloo (CPU), for NumPy arrays and CPU torch tensors."""

    def __init__(self, placement: Placement, timeout: float):
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            raise DistributedError(f"data-parallel training needs torch.distributed: {INSTALL}") from None
        if not dist.is_available():
            raise DistributedError(f"this torch build has no torch.distributed: {INSTALL}")
        self._torch, self._dist = torch, dist
        self.rank, self.world_size, self.timeout = placement.rank, placement.world_size, timeout
        if placement.init_method is None:
            raise DistributedError(_no_rendezvous(placement.launcher))
        stale = ""
        if placement.init_method.startswith("file://"):
            folder = rendezvous_folder(placement.init_method)
            if not os.path.isdir(folder):  # torch's file store would wait its own 300 s for it, deaf to signals
                raise DistributedError(f"XPCNN_RENDEZVOUS: {folder} is not a directory here (not mounted?)")
            if placement.launcher != "xpcnn":  # --nproc's file is new in a folder of its own: never stale
                stale = "; a file left by a killed run stops every later run that names it: remove it first"
        try:
            dist.init_process_group(
                "gloo",
                init_method=placement.init_method,
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
        except (RuntimeError, ValueError) as exc:
            raise RankLost(
                f"rank {self.rank}: the {self.world_size} ranks did not all meet within {timeout:g} s "
                f"at {placement.init_method}: {_first_line(exc)}{stale}"
            ) from None

    def _tensor(self, array):
        return array if isinstance(array, self._torch.Tensor) else self._torch.from_numpy(array)

    def _collective(self, name: str, call):
        try:
            call()
        except RuntimeError as exc:
            raise RankLost(
                f"rank {self.rank}: another rank died or did not answer within {self.timeout:g} s "
                f"(XPCNN_DIST_TIMEOUT) during {name}: {_first_line(exc)}"
            ) from None

    def all_reduce_sum(self, array):
        self._collective("an all-reduce", lambda: self._dist.all_reduce(self._tensor(array)))
        return array

    def broadcast(self, array):
        self._collective("a broadcast", lambda: self._dist.broadcast(self._tensor(array), src=0))
        return array

    def barrier(self) -> None:
        self._collective("a barrier", lambda: self._dist.barrier())

    def close(self) -> None:
        if self._dist.is_initialized():
            self.barrier()
            self._leave()

    def _leave(self) -> None:
        """Close the connections: a rank that exits with them open can abort in gloo's threads."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_backend(backend: Backend, world_size: int) -> None:
    """DistributedError unless ``world_size`` ranks can train on ``backend``: NumPy, torch or JAX on the CPU."""
    if world_size > 1 and (backend.name not in ("numpy", "torch", "jax") or backend.is_gpu):
        raise DistributedError(
            f"data-parallel training ({world_size} ranks) runs on the numpy, torch and jax backends on the CPU, "
            f"not on {backend.describe()}"
        )


# ---------------------------------------------------------------- the model and the batch over the ranks


def broadcast_state(model, communicator: Communicator) -> None:
    """Give every rank rank 0's parameters and buffers (so all ranks start from the same model)."""
    if communicator.world_size == 1:
        return
    state = model.state_dict()  # host copies
    for name in sorted(state):
        communicator.broadcast(state[name].reshape(-1))
    model.load_state_dict(state)


def shard_bounds(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of the global batch [start, stop) that ``rank`` takes; the batch divides evenly."""
    size, extra = divmod(stop - start, world_size)
    if extra:
        raise ValueError(f"a global batch of {stop - start} does not split evenly over {world_size} ranks")
    return start + rank * size, start + (rank + 1) * size


def check_batch_size(batch_size: int, world_size: int) -> None:
    """ConfigError unless the global batch splits evenly over the ranks."""
    if batch_size % world_size:
        raise ConfigError(f"a global batch of {batch_size} does not split evenly over {world_size} ranks", "batch_size")


def check_images_per_rank(n: int, batch_size: int, world_size: int) -> None:
    """ConfigError unless ``world_size`` ranks with global batch ``batch_size`` each get one of ``n`` images."""
    if usable_count(n, batch_size, world_size) == 0:
        raise ConfigError(f"{n} training image(s) for {world_size} ranks: each rank needs one at least")


def usable_count(n: int, batch_size: int, world_size: int) -> int:
    """How many of an epoch's ``n`` shuffled images ``world_size`` ranks train on with global batch ``batch_size``.

    Every full batch; of the last, short one the largest part that splits evenly over the ranks (the rest,
    fewer than ``world_size`` images, is left out of that epoch; one rank leaves out nothing).
    """
    last = n % batch_size or batch_size
    return n - last % world_size


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """An epoch's optimiser steps: one per global batch of the :func:`usable_count` images it trains on."""
    return math.ceil(usable_count(n, batch_size, world_size) / batch_size)
