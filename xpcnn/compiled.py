"""The JAX training and evaluation steps as compiled XLA programs: the core's steps (step.py), as they are.

:class:`CompiledSteps` compiles :meth:`xpcnn.step.Step.train` (gather the batch,
augmentation and dropout draws, forward, loss, backward, optimiser update) and
:meth:`xpcnn.step.Step.evaluate` with ``jax.jit``: there is no second copy of
any layer's math, and the steps are pure functions of their arguments:

* in: the :class:`xpcnn.step.TrainState` (flat parameters, optimiser slots, batch
  norm's running statistics; donated: their buffers are reused for the results),
  the device dataset and the batch's indices, the epoch's key, the step, the
  learning rate and the optimiser's step count (traced values, so a new learning
  rate neither recompiles nor is baked in);
* out: the new state, the model's parameters cut from the new flat buffer (cut
  inside the program: outside, each slice would be a dispatch), the batch's mean
  loss and its number of correct predictions.

Randomness: step ``s`` of epoch ``e`` draws from ``fold_in(key(seed, e), s)``,
so a run is a pure function of (seed, epoch, step) and resuming anywhere,
even mid-epoch, continues exactly as a straight run.

Each distinct argument signature (the full batch, the last short one, an
evaluation batch) is compiled once, ahead of time, with the XLA options of
:func:`xpcnn.fastpath.compiler_options`, and its compile time is
counted in :attr:`CompiledSteps.compile_seconds`, apart from the steps' own.
With ``compile=False`` the same step functions run eagerly, one dispatch per
operation (for debugging: breakpoints and prints inside layers work).
"""

from __future__ import annotations

import time

from . import fastpath
from .backend import Backend
from .device_data import DeviceSplit, EvalResult, evaluate_batches
from .distributed import DistributedError, Local
from .distributed_jax import AXIS, DataParallelStep, InStep
from .nn import CrossEntropyLoss, Sequential
from .rng import JaxGenerator, seed_to_int
from .step import Metrics, Step, lent


class _AheadOfTime:
    """``jax.jit(function)``, compiled with XLA options ``options`` once per argument signature, each timed."""

    def __init__(self, function, options: dict, donate_argnums=()):
        import jax

        self._jax = jax
        self._jitted = jax.jit(function, donate_argnums=donate_argnums)
        self._options = options
        self._executables: dict = {}
        self.compilations = 0
        self.seconds = 0.0

    def __call__(self, *args):
        leaves, tree = self._jax.tree.flatten(args)
        signature = (tree, *((getattr(a, "shape", None), getattr(a, "dtype", type(a))) for a in leaves))
        executable = self._executables.get(signature)
        if executable is None:
            started = time.perf_counter()
            executable = self._jitted.lower(*args).compile(compiler_options=self._options)
            self._executables[signature] = executable
            self.seconds += time.perf_counter() - started
            self.compilations += 1
        return executable(*args)


class CompiledSteps:
    """Training and evaluation steps of ``model`` with ``loss_fn`` and ``optimizer`` on the JAX backend.

    The runner the :class:`xpcnn.train.Trainer` asks to run each batch.  ``compile=False`` runs the same
    steps eagerly.
    """

    def __init__(
        self,
        model: Sequential,
        loss_fn: CrossEntropyLoss,
        optimizer,
        backend: Backend,
        seed: int,
        augmentation=None,
        background: float = 0.0,
        compile: bool = True,
        communicator=None,
    ):
        """With a ``communicator`` of several ranks the step runs over all their devices
        (:mod:`xpcnn.distributed_jax`): batch norm's statistics and the gradient are summed with ``psum`` inside it."""
        import jax

        self._ranks = (communicator or Local()).world_size
        if self._ranks > 1 and not compile:
            raise DistributedError("data-parallel training on the jax backend runs compiled: leave out --eager")
        self.model, self.optimizer, self.backend, self.seed = model, optimizer, backend, seed
        in_step = InStep(self._ranks) if self._ranks > 1 else None
        self.step = Step(model, loss_fn, optimizer, augmentation, background, communicator=in_step)
        self.compiles = compile
        self._jax = jax
        self._epoch_key = None
        if compile:
            options = fastpath.compiler_options(backend.device)

            def compiled(function):
                return _AheadOfTime(function, options, donate_argnums=(0,))

            self._train = DataParallelStep(self._train_step, compiled) if self._ranks > 1 else compiled(self._train_step)
            self._evaluate = _AheadOfTime(self.step.evaluate, options)
        else:
            self._train, self._evaluate = self._train_step, self.step.evaluate

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, training and evaluation steps together."""
        return self._train.seconds + self._evaluate.seconds if self.compiles else 0.0

    @property
    def compilations(self) -> int:
        """Programs compiled so far: one per distinct shape of training or evaluation batch."""
        return self._train.compilations + self._evaluate.compilations if self.compiles else 0

    def start_epoch(self, epoch: int, step: int) -> None:
        """Set the key that epoch ``epoch`` draws from (step ``s`` folds in ``s``, so ``step`` needs no part)."""
        with self.backend.activate():
            self._epoch_key = self._jax.device_put(
                self._jax.random.key(seed_to_int((self.seed, epoch))), self.backend.device
            )

    def train_step(self, images, labels, batch, step: int):
        """One optimiser step on ``images[batch]`` (B, 1, 28, 28), ``labels[batch]``: (mean loss, correct) 0-d."""
        state, parameters, metrics = self._train(
            self.step.state(), images, labels, batch, self._epoch_key, step, self.optimizer.lr, self.optimizer.steps + 1
        )
        self.step.adopt(state, parameters)
        return metrics

    def evaluate(self, split: DeviceSplit, batch_size: int = 1000) -> EvalResult:
        """Mean loss, accuracy and host predictions of the model on ``split``, in evaluation mode."""
        return evaluate_batches(split, self.backend, self.evaluate_batch, batch_size)

    def evaluate_batch(self, x, y):
        """(float64 sum of the losses, predictions (N,)) for ``x`` (N, 1, 28, 28), ``y`` (N,), evaluation mode."""
        return self._evaluate(dict(self.model.named_parameters()), dict(self.model.named_buffers()), x, y)

    def _train_step(self, state, images, labels, batch, epoch_key, step, lr, count):
        key = self._jax.random.fold_in(epoch_key, step)
        if self._ranks == 1:
            state, metrics = self.step.train(state, images, labels, batch, JaxGenerator.from_key(key), lr, count)
        else:  # each rank its own noise, (seed, epoch, step, rank); batch norm's sums over the ranks
            key = self._jax.random.fold_in(key, self._jax.lax.axis_index(AXIS))
            with lent(self.model):
                self.model.set_communicator(self.step.communicator)
                state, metrics = self.step.train(state, images, labels, batch, JaxGenerator.from_key(key), lr, count)
            metrics = Metrics(*(self._jax.numpy.reshape(m, (1,)) for m in metrics))  # each rank's own (sharded)
        parameters = {} if state.params is None else self.optimizer.split(state.params)
        return state, parameters, metrics
