"""The JAX training and evaluation steps as compiled XLA programs: the core's steps (step.py), as they are.

:class:`CompiledSteps` compiles :meth:`xpcnn.training.step.Step.train` (gather the batch,
augmentation and dropout draws, forward, loss, backward, optimiser update) and
:meth:`xpcnn.training.step.Step.evaluate` with ``jax.jit``: there is no second copy of
any layer's math, and the steps are pure functions of their arguments:

* in: the :class:`xpcnn.training.step.TrainState` (flat parameters, optimiser slots, batch
  norm's running statistics; donated: their buffers are reused for the results),
  the device dataset and the batch's indices, the epoch's seed, the step, the
  learning rate and the optimiser's step count (traced values, so a new learning
  rate neither recompiles nor is baked in);
* out: the new state, the model's parameters cut from the new flat buffer (cut
  inside the program: outside, each slice would be a dispatch), the batch's mean
  loss and its number of correct predictions.

Randomness: step ``s`` of epoch ``e`` draws from ``fold_in(key(seed, e), s)``,
so a run is a pure function of (seed, epoch, step) and resuming anywhere,
even mid-epoch, continues exactly as a straight run.  The key is made inside
the programs from the epoch's seed number, a device scalar put there by a
transfer: made outside, by eager calls, it would cost two one-operation
programs compiled in the first epoch.

The epoch program (:meth:`CompiledSteps.train_steps`): the full-batch steps of an
epoch from one step to another, as one program: a ``lax.fori_loop`` over
:meth:`Step.train` (the same step, traced once), each step slicing its batch from
the epoch's permutation on the device, drawing its noise from
``fold_in(key(seed, e), s)`` and reading its learning rate from the epoch's
schedule, a (steps,) device array; the running loss sum and correct count are
carried through the loop and come out with the new state.  Its bounds are traced
values, so any chunk of an epoch (the ``--log-every`` steps, a resumed part, the
whole epoch) runs the one program; the last short batch of an epoch runs as one step.

Each distinct argument signature (the full batch, the last short one, an
evaluation batch, an epoch program's batch size) is compiled once, ahead of time, with the XLA options of
:func:`xpcnn.ops.fastpath.compiler_options`.  :attr:`CompiledSteps.compile_seconds` counts, by JAX's
monitoring events, every second JAX spends tracing, lowering and compiling: these programs', and
those of the one-operation programs that eager calls (the first gathering of the flat parameters,
say) compile on first use; the trainer counts them apart from the steps' own time.
With ``compile=False`` the same step functions run eagerly, one dispatch per
operation (for debugging: breakpoints and prints inside layers work).
"""

from __future__ import annotations

import functools

import numpy as np

from ..backends.backend import Backend
from ..backends.distributed import DistributedError, Local
from ..backends.distributed_jax import AXIS, DataParallelStep, InStep
from ..base.rng import JaxGenerator, seed_to_int
from ..data.device_data import DeviceSplit, EvalResult, evaluate_batches
from ..nn import CrossEntropyLoss, Sequential
from ..ops import fastpath
from .step import Metrics, Step, lent

# JAX's monitoring events for the three stages of making a program (jax._src.dispatch).
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


class _CompileClock:
    """Seconds this process's JAX has spent making programs, summed from its monitoring events."""

    seconds = 0.0
    _listening = False

    @classmethod
    def start(cls) -> None:
        if not cls._listening:
            import jax

            jax.monitoring.register_event_duration_secs_listener(cls._record)
            cls._listening = True

    @classmethod
    def _record(cls, event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            cls.seconds += duration


class _AheadOfTime:
    """``jax.jit(function)``, compiled with XLA options ``options`` once per argument signature."""

    def __init__(self, function, options: dict, donate_argnums=()):
        import jax

        self._jax = jax
        self._jitted = jax.jit(function, donate_argnums=donate_argnums)
        self._options = options
        self._executables: dict = {}
        self.compilations = 0

    def __call__(self, *args):
        leaves, tree = self._jax.tree.flatten(args)
        signature = (tree, *((getattr(a, "shape", None), getattr(a, "dtype", type(a))) for a in leaves))
        executable = self._executables.get(signature)
        if executable is None:
            # Work still running (the steps before a short last batch) is training time, which the clock would
            # take out of the epoch's seconds with the compiling that overlapped it: let it end first.
            self._jax.block_until_ready(leaves)
            executable = self._jitted.lower(*args).compile(compiler_options=self._options)
            self._executables[signature] = executable
            self.compilations += 1
        return executable(*args)


class CompiledSteps:
    """Training and evaluation steps of ``model`` with ``loss_fn`` and ``optimizer`` on the JAX backend.

    The runner the :class:`xpcnn.training.train.Trainer` asks to run each batch.  ``compile=False`` runs the same
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
        (:mod:`xpcnn.backends.distributed_jax`): batch norm's statistics and the gradient are summed with ``psum``
        inside it."""
        import jax

        self._ranks = (communicator or Local()).world_size
        if self._ranks > 1 and not compile:
            raise DistributedError("data-parallel training on the jax backend runs compiled: leave out --eager")
        self.model, self.optimizer, self.backend, self.seed = model, optimizer, backend, seed
        in_step = InStep(self._ranks) if self._ranks > 1 else None
        self.step = Step(model, loss_fn, optimizer, augmentation, background, communicator=in_step)
        self.compiles = compile
        self._jax = jax
        self._epoch_seed = None
        if compile:
            _CompileClock.start()
            self._clock_start = _CompileClock.seconds
            options = fastpath.compiler_options(backend.device)

            def compiled(function):
                return _AheadOfTime(function, options, donate_argnums=(0,))

            self._train = (
                DataParallelStep(self._train_step, compiled) if self._ranks > 1 else compiled(self._train_step)
            )
            self._evaluate = _AheadOfTime(self.step.evaluate, options)
            self._compiled = compiled
        else:
            self._train, self._evaluate = self._train_step, self.step.evaluate
        self._programs: dict = {}  # the epoch programs, by batch size

    @property
    def runs_epoch_programs(self) -> bool:
        """Whether :meth:`train_steps` can run: compiled, on one process (several ranks run step by step)."""
        return self.compiles and self._ranks == 1

    @property
    def compile_seconds(self) -> float:
        """Seconds JAX has spent making programs since these steps were made: the training and evaluation
        steps, the epoch programs, and the one-operation programs of eager calls (the module docstring)."""
        if not self.compiles:
            return 0.0
        return _CompileClock.seconds - self._clock_start

    @property
    def compilations(self) -> int:
        """Programs compiled so far: one per distinct shape of training or evaluation batch, and of epoch program."""
        if not self.compiles:
            return 0
        return sum(program.compilations for program in (self._train, self._evaluate, *self._programs.values()))

    def start_epoch(self, epoch: int, step: int) -> None:
        """Set the seed of the key that epoch ``epoch`` draws from (step ``s`` folds in ``s``, so ``step`` needs
        no part)."""
        self._epoch_seed = self.backend.asarray(np.int64(seed_to_int((self.seed, epoch))))

    def train_step(self, images, labels, batch, step: int):
        """One optimiser step on ``images[batch]`` (B, 1, 28, 28), ``labels[batch]``: (mean loss, correct) 0-d."""
        optimizer = self.optimizer
        state, parameters, metrics = self._train(
            self.step.state(), images, labels, batch, self._epoch_seed, step, optimizer.lr, optimizer.steps + 1
        )
        self.step.adopt(state, parameters)
        return metrics

    def learning_rates(self, values):
        """An epoch's learning rates (steps,) on the device, in the parameters' dtype (as the steps use them)."""
        parameters = [value for _, value in self.model.named_parameters()]
        dtype = parameters[0].dtype if parameters else self.backend.xp.float32
        return self.backend.asarray(np.asarray(values, dtype=np.float64), dtype)

    def train_steps(
        self, images, labels, order, learning_rates, first: int, end: int, batch_size: int, loss_sum, correct
    ):
        """Steps ``first`` .. ``end - 1`` of the epoch as one program, each on a full batch.

        Step ``s`` trains on ``images[order[s * batch_size : (s + 1) * batch_size]]`` with learning rate
        ``learning_rates[s]`` (:meth:`learning_rates`).  ``loss_sum`` and ``correct`` (0-d) are the epoch's
        running sums: returned with each step's ``batch_size * mean loss`` and correct predictions added.
        """
        program = self._programs.get(batch_size)
        if program is None:
            program = self._programs[batch_size] = self._compiled(functools.partial(self._epoch_program, batch_size))
        state, parameters, loss_sum, correct = program(
            self.step.state(),
            images,
            labels,
            order,
            learning_rates,
            self._epoch_seed,
            first,
            end,
            self.optimizer.steps + 1 - first,
            loss_sum,
            correct,
        )
        self.step.adopt(state, parameters, steps=end - first)
        return loss_sum, correct

    def evaluate(self, split: DeviceSplit, batch_size: int = 1000) -> EvalResult:
        """Mean loss, accuracy and host predictions of the model on ``split``, in evaluation mode."""
        return evaluate_batches(split, self.backend, self.evaluate_batch, batch_size)

    def evaluate_batch(self, x, y):
        """(float64 sum of the losses, predictions (N,)) for ``x`` (N, 1, 28, 28), ``y`` (N,), evaluation mode."""
        return self._evaluate(dict(self.model.named_parameters()), dict(self.model.named_buffers()), x, y)

    def _train_step(self, state, images, labels, batch, epoch_seed, step, lr, count):
        key = self._jax.random.fold_in(self._jax.random.key(epoch_seed), step)
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

    def _epoch_program(
        self, batch_size, state, images, labels, order, lrs, epoch_seed, first, end, count0, loss_sum, correct
    ):
        """Steps ``first`` .. ``end - 1`` (traced) in a loop: step ``s`` is optimiser step ``count0 + s``."""
        jax = self._jax
        epoch_key = jax.random.key(epoch_seed)

        def step(s, carry):
            state, loss_sum, correct = carry
            batch = jax.lax.dynamic_slice_in_dim(order, s * batch_size, batch_size)
            generator = JaxGenerator.from_key(jax.random.fold_in(epoch_key, s))
            state, metrics = self.step.train(state, images, labels, batch, generator, lrs[s], count0 + s)
            # The trainer's running sums, added in the same order and dtypes as step by step.
            loss_sum = (loss_sum + metrics.loss * batch_size).astype(loss_sum.dtype)
            return state, loss_sum, (correct + metrics.correct).astype(correct.dtype)

        state, loss_sum, correct = jax.lax.fori_loop(first, end, step, (state, loss_sum, correct))
        parameters = {} if state.params is None else self.optimizer.split(state.params)
        return state, parameters, loss_sum, correct
