"""Seeded random-number adapters, one per array library: the Array API standard has no random module.

Every adapter takes a backend (an :class:`xpcnn.backends.backend.Backend`) and a seed tuple (run seed,
epoch, step...) and offers ``random(shape, dtype)`` (uniform in [0, 1)), ``normal(shape, dtype)``
and ``permutation(n)`` (int64), drawn on the backend's device.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def seed_to_int(seed: tuple[int, ...]) -> int:
    """Mix a tuple of non-negative ints (run seed, epoch, step...) into one 63-bit seed."""
    return int(np.random.SeedSequence(list(seed)).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class HostGenerator:
    """Random numbers drawn on the host with NumPy's PCG64, then moved to the backend."""

    def __init__(self, backend, seed: tuple[int, ...]):
        self._backend = backend
        self._rng = np.random.default_rng(list(seed))

    def random(self, shape: tuple[int, ...], dtype) -> Any:
        """Uniform floats in [0, 1)."""
        return self._backend.asarray(self._rng.random(shape, dtype=host_dtype(dtype)))

    def normal(self, shape: tuple[int, ...], dtype) -> Any:
        """Standard normal floats."""
        return self._backend.asarray(self._rng.standard_normal(shape, dtype=host_dtype(dtype)))

    def permutation(self, n: int) -> Any:
        """A random permutation of ``range(n)`` as int64."""
        return self._backend.asarray(self._rng.permutation(n).astype(np.int64))


class CupyGenerator:
    """Random numbers drawn on the GPU with CuPy's generator: no host round trip."""

    def __init__(self, backend, seed: tuple[int, ...]):
        import cupy

        with backend.activate():
            self._rng = cupy.random.default_rng(seed_to_int(seed))
        self._backend = backend

    def random(self, shape, dtype):
        with self._backend.activate():
            return self._rng.random(shape, dtype=dtype)

    def normal(self, shape, dtype):
        with self._backend.activate():
            return self._rng.standard_normal(shape, dtype=dtype)

    def permutation(self, n):
        import cupy

        # CuPy's Generator has no permutation(): sort n uniform draws instead (ties have
        # probability ~n^2 / 2^54, and the stable sort would still give a permutation).
        with self._backend.activate():
            return cupy.argsort(self._rng.random(n, dtype="float64")).astype("int64")


class TorchGenerator:
    """Random numbers drawn on the tensors' device with a seeded ``torch.Generator``."""

    def __init__(self, backend, seed: tuple[int, ...]):
        import torch

        self._torch, self._device = torch, backend.device
        self._rng = torch.Generator(device=backend.device).manual_seed(seed_to_int(seed))

    def random(self, shape, dtype):
        return self._torch.rand(shape, generator=self._rng, dtype=dtype, device=self._device)

    def normal(self, shape, dtype):
        return self._torch.randn(shape, generator=self._rng, dtype=dtype, device=self._device)

    def permutation(self, n):
        return self._torch.randperm(n, generator=self._rng, dtype=self._torch.int64, device=self._device)


class JaxGenerator:
    """Random numbers from ``jax.random``: the adapter holds a key and splits off a fresh one per draw."""

    def __init__(self, backend, seed: tuple[int, ...]):
        import jax

        self._random = jax.random
        self._key = jax.device_put(jax.random.key(seed_to_int(seed)), backend.device)

    @classmethod
    def from_key(cls, key) -> JaxGenerator:
        """The adapter over a given key (inside a compiled step: a traced one, derived from the step's position)."""
        import jax

        generator = cls.__new__(cls)
        generator._random, generator._key = jax.random, key
        return generator

    def _next_key(self):
        self._key, key = self._random.split(self._key)
        return key

    def random(self, shape, dtype):
        return self._random.uniform(self._next_key(), shape, dtype)

    def normal(self, shape, dtype):
        return self._random.normal(self._next_key(), shape, dtype)

    def permutation(self, n):
        return self._random.permutation(self._next_key(), n).astype("int64")


def host_dtype(dtype) -> np.dtype:
    """The NumPy dtype with the same name as any namespace's dtype (``array_api_strict.float32`` -> float32)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])
