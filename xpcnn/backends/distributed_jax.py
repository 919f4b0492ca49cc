"""Data parallelism on JAX: ``jax.distributed`` for the processes, a ``psum`` inside the compiled step.

Each rank is one JAX process with one CPU device; the processes meet with ``jax.distributed.initialize``
(gloo collectives on the CPU).  :class:`JaxCommunicator` does the few host-side collectives the trainer
needs (its metric sums, agreeing to stop, the initial broadcast) with ``jax.experimental.multihost_utils``;
:func:`data_parallel_step` runs a training step under ``jax.shard_map`` over a mesh of every process's
device, where :class:`InStep` turns batch norm's and the gradient's sums into ``jax.lax.psum``, so the
step stays one compiled program.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .distributed import Communicator, DistributedError, Placement, RankLost, is_port

AXIS = "data"


def initialize(placement: Placement, timeout: float) -> None:
    """``jax.distributed.initialize`` for ``placement``, at ``XPCNN_COORDINATOR``; DistributedError without it."""
    import os

    address = os.environ.get("XPCNN_COORDINATOR")
    if not address:
        raise DistributedError(
            f"{placement.launcher} started {placement.world_size} ranks on the jax backend but named no "
            "coordinator: set XPCNN_COORDINATOR to rank 0's host:port (xpcnn train --nproc sets it)"
        )
    host, colon, port = address.rpartition(":")
    if not (colon and host and is_port(port)):
        raise DistributedError(f"XPCNN_COORDINATOR must be rank 0's host:port (a port 1 to 65535), got {address!r}")
    if placement.rank == 0 and not port_is_free(int(port)):  # JAX's coordinator would die of it, a segfault
        raise DistributedError(f"rank 0: XPCNN_COORDINATOR's port {port} is in use: name a free one")
    seconds = max(1, round(timeout))
    import jax

    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=placement.world_size,
            process_id=placement.rank,
            initialization_timeout=seconds,
            heartbeat_timeout_seconds=seconds,
            shutdown_timeout_seconds=seconds,
        )
    except RuntimeError as exc:
        raise DistributedError(f"rank {placement.rank}: jax.distributed.initialize at {address}: {exc}") from None


def port_is_free(port: int) -> bool:
    """Whether no socket listens on TCP ``port`` on any address, as JAX's coordinator does (``[::]``); one in
    TIME_WAIT, which the coordinator takes, is free."""
    import socket

    for family, everywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            probe = socket.socket(family)
        except OSError:  # no IPv6 in this kernel: IPv4's every address
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((everywhere, port))
            except OSError:
                return False
        return True
    return True


class JaxCommunicator(Communicator):
    """Host-side collectives among JAX processes (``multihost_utils``): of NumPy arrays, filled in place, and of
    JAX arrays (batch norm's statistics in an eager pass), which cannot be: a new one."""

    def __init__(self, placement: Placement):
        import jax
        from jax.experimental import multihost_utils

        if jax.process_count() != placement.world_size:
            raise DistributedError(
                f"rank {placement.rank}: JAX sees {jax.process_count()} process(es) of {placement.world_size}: "
                "call xpcnn.backends.ranks.prepare('jax') before anything uses JAX"
            )
        self._utils, self._jnp = multihost_utils, jax.numpy
        self.rank, self.world_size = placement.rank, placement.world_size

    def all_reduce_sum(self, array):
        with self.failures():
            summed = np.asarray(self._utils.process_allgather(array)).sum(axis=0)
        if not isinstance(array, np.ndarray):  # a JAX array is immutable: the caller uses the result
            return self._jnp.asarray(summed, dtype=array.dtype)
        array[...] = summed
        return array

    def broadcast(self, array):
        with self.failures():
            array[...] = np.asarray(self._utils.broadcast_one_to_all(array))
        return array

    def barrier(self) -> None:
        with self.failures():
            self._utils.sync_global_devices("xpcnn")

    @contextlib.contextmanager
    def failures(self):
        # A lost peer surfaces as the runtime's error (JaxRuntimeError, a RuntimeError) in a compiled step, or
        # as a ValueError from multihost_utils' gathers; either names gloo's reason last.
        try:
            yield
        except (RuntimeError, ValueError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "Gloo" not in text and "gloo" not in text and "DEADLINE" not in text and "heartbeat" not in text:
                raise
            reason = text.rpartition("Error dispatching computation: ")[2]
            raise RankLost(f"rank {self.rank}: another rank died or did not answer: {reason}") from None


class InStep(Communicator):
    """The sums of a traced step under ``shard_map``: ``jax.lax.psum`` over the ranks' axis."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def all_reduce_sum(self, array):
        import jax

        return jax.lax.psum(array, AXIS)


class DataParallelStep:
    """``step(state, images, labels, batch, epoch_seed, step, lr, count)`` of
    :class:`xpcnn.training.compiled.CompiledSteps` over every process's device.

    Each process gives its local arrays (its shard of the global batch as ``batch``); they are wrapped
    as global arrays (replicated, the batch sharded) without a copy, the step runs under ``shard_map``,
    compiled by ``wrap``, and the results come back as this process's local arrays (its metrics its own).
    """

    def __init__(self, step, wrap):
        import jax
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        self._jax = jax
        mesh = Mesh(np.array(jax.devices()), (AXIS,))
        self._replicated, self._sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
        self._count = len(jax.devices())
        replicated, sharded = P(), P(AXIS)
        mapped = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(replicated,) * 3 + (sharded,) + (replicated,) * 4,
            out_specs=(replicated, replicated, sharded),
            check_vma=False,
        )
        self._compiled = wrap(mapped)

    @property
    def compilations(self) -> int:
        return self._compiled.compilations

    def _global(self, local, sharding, scale: int = 1):
        shape = (local.shape[0] * scale, *local.shape[1:]) if scale > 1 else local.shape
        return self._jax.make_array_from_single_device_arrays(shape, sharding, [local])

    def __call__(self, state, images, labels, batch, epoch_seed, step, lr, count):
        jax, device = self._jax, batch.devices().pop()
        # As arrays: a global array's scalars must be arrays too; lr in the parameters' dtype, as the Python
        # number of the one-process step is (JAX's weak typing: it does not promote float32 parameters).
        scalars = [jax.device_put(np.asarray(v), device) for v in (step, np.asarray(lr, state.params.dtype), count)]
        replicated = jax.tree.map(lambda a: self._global(a, self._replicated), (state, images, labels))
        out = self._compiled(
            *replicated,
            self._global(batch, self._sharded, self._count),
            self._global(epoch_seed, self._replicated),
            *(self._global(s, self._replicated) for s in scalars),
        )
        state, parameters, metrics = jax.tree.map(lambda a: a.addressable_data(0), out)
        return state, parameters, type(metrics)(*(m[0] for m in metrics))
