"""The JAX training and evaluation steps as compiled XLA programs, built from the same layers and optimiser.

:class:`CompiledSteps` traces one training step (gather the batch, augmentation
and dropout draws, forward, loss, backward, optimiser update) and one
evaluation step through the model's own ``forward`` / ``backward`` and the
optimiser's functional ``update``, and compiles each with ``jax.jit``: there is
no second copy of any layer's math.  The layers keep their state on ``self``
(parameters, the caches for backward); during a trace the model lends its
layers (:func:`_borrowed`), their attributes are restored afterwards, and the
arrays that change go in and come out as arguments and results:

* in: the optimiser's flat parameters and state, batch norm's running
  statistics (all three donated: their buffers are reused for the results),
  the device dataset and the batch's indices, the epoch's key, the step,
  the learning rate and the optimiser's step count (traced values, so a
  new learning rate neither recompiles nor is baked in);
* out: the same buffers updated, the model's parameters cut from the new
  flat buffer, the batch's mean loss and its number of correct predictions.

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

import contextlib
import copy
import time

from . import fastpath
from .backend import Backend, namespace
from .device_data import DeviceSplit, EvalResult, evaluate_batches
from .distributed import DistributedError, Local
from .distributed_jax import AXIS, DataParallelStep, InStep
from .nn import CrossEntropyLoss, Sequential
from .rng import JaxGenerator, seed_to_int


@contextlib.contextmanager
def _borrowed(model: Sequential):
    """Let a step use the model's layers, then restore every layer attribute as it was.

    Inside, each layer has its own copies of the ``params``, ``grads`` (empty) and ``buffers`` dicts, so
    what the step assigns (traced arrays, caches, a generator) never outlives it.
    """
    saved = [dict(vars(layer)) for layer in model]
    for layer in model:
        layer.params, layer.grads, layer.buffers = dict(layer.params), {}, dict(layer.buffers)
    try:
        yield model
    finally:
        for layer, attributes in zip(model, saved, strict=True):
            vars(layer).clear()
            vars(layer).update(attributes)


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

        self.model, self.loss_fn, self.optimizer, self.backend = model, loss_fn, optimizer, backend
        self.seed, self.augmentation, self.background = seed, augmentation, background
        self.compiles = compile
        self._jax = jax
        self._epoch_key = None
        self._ranks = (communicator or Local()).world_size
        if self._ranks > 1 and not compile:
            raise DistributedError("data-parallel training on the jax backend runs compiled: leave out --eager")
        if compile:
            options = fastpath.compiler_options(backend.device)

            def wrap(step):
                return _AheadOfTime(step, options, donate_argnums=(0, 1, 2))

            self._train = DataParallelStep(self._train_step, wrap) if self._ranks > 1 else wrap(self._train_step)
            self._evaluate = _AheadOfTime(self._eval_step, options)
        else:
            self._train, self._evaluate = self._train_step, self._eval_step

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
        flat, state = self.optimizer.buffers()
        self.model.train()
        flat, state, buffers, parameters, loss, correct = self._train(
            flat,
            state,
            dict(self.model.named_buffers()),
            images,
            labels,
            batch,
            self._epoch_key,
            step,
            self.optimizer.lr,
            self.optimizer.steps + 1,
        )
        self.optimizer.adopt(flat, state, parameters)
        self.model.set_buffers(buffers)
        return loss, correct

    def evaluate(self, split: DeviceSplit, batch_size: int = 1000) -> EvalResult:
        """Mean loss, accuracy and host predictions of the model on ``split``, in evaluation mode."""
        return evaluate_batches(split, self.backend, self.evaluate_batch, batch_size)

    def evaluate_batch(self, x, y):
        """(float64 sum of the losses, predictions (N,)) for ``x`` (N, 1, 28, 28), ``y`` (N,), evaluation mode."""
        self.model.eval()
        return self._evaluate(dict(self.model.named_parameters()), dict(self.model.named_buffers()), x, y)

    def _train_step(self, flat, state, buffers, images, labels, batch, epoch_key, step, lr, steps):
        xp = namespace(images)
        key = self._jax.random.fold_in(epoch_key, step)
        if self._ranks > 1:  # each rank its own noise: (seed, epoch, step, rank)
            key = self._jax.random.fold_in(key, self._jax.lax.axis_index(AXIS))
        generator = JaxGenerator.from_key(key)
        loss_fn = copy.copy(self.loss_fn)  # it keeps the gradient of the last loss
        state = dict(state)
        with _borrowed(self.model) as model:
            model.train()
            model.set_communicator(InStep(self._ranks) if self._ranks > 1 else None)
            model.set_parameters(self.optimizer.split(flat))
            model.set_buffers(buffers)
            model.set_generator(generator)
            x = xp.take(images, batch, axis=0)
            y = xp.take(labels, batch, axis=0)
            if self.augmentation is not None:
                x = self.augmentation(x, generator, fill=self.background)
            logits = model.forward(x)
            loss = loss_fn.forward(logits, y)
            model.backward(loss_fn.backward(), input_grad=False)
            grad = self.optimizer.flat_gradient(dict(model.named_gradients()))
            if self._ranks > 1:  # the hook: the mean of the ranks' gradients, inside the one program
                grad = self._jax.lax.psum(grad, AXIS) / self._ranks
            flat = self.optimizer.update(flat, grad, state, lr, steps)
            buffers = dict(model.named_buffers())
        correct = xp.count_nonzero(xp.argmax(logits, axis=1) == y)
        if self._ranks > 1:  # each rank's own, as the trainer sums them
            loss, correct = xp.reshape(loss, (1,)), xp.reshape(correct, (1,))
        return flat, state, buffers, self.optimizer.split(flat), loss, correct

    def _eval_step(self, parameters, buffers, x, y):
        xp = namespace(x)
        with _borrowed(self.model) as model:
            model.eval()
            model.set_parameters(parameters)
            model.set_buffers(buffers)
            logits = model.forward(x)
        loss = CrossEntropyLoss(check_labels=False).forward(logits, y)
        return xp.astype(loss, xp.float64) * y.shape[0], xp.argmax(logits, axis=1)
