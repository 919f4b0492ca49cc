"""The training loop over epochs and steps on device-resident data, on one rank or as one of several: its
set-up, its step runners, evaluation and prediction (run directories: runs.py).

Splits are copied to the device once (device_data.py); batches are gathered there with ``take`` from a
per-epoch permutation.  The host reads values back only at the log interval and at the end of an epoch, so a
GPU is never synchronised after every step.

Randomness is a pure function of (seed, epoch, step): epoch ``e`` shuffles with NumPy's generator seeded
``[seed, e]`` and draws dropout noise from ``backend.generator(seed, e, s)`` where ``s`` is the step the epoch
(re)started at (on JAX, each step ``s`` from its own key, see :mod:`xpcnn.training.compiled`).  A checkpoint
therefore only needs the seed and the position, and resuming at an epoch boundary continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..backends.backend import Backend, to_host
from ..backends.distributed import (
    Communicator,
    Local,
    broadcast_state,
    check_backend,
    check_batch_size,
    check_images_per_rank,
    shard_bounds,
    steps_per_epoch,
    usable_count,
)
from ..base.errors import ConfigError, NonFiniteOutputs, XpcnnError
from ..base.stopping import stop_on_signals
from ..data.data import split_validation
from ..data.device_data import DeviceSplit, EvalResult, Normalization, evaluate_batches, input_dtype
from ..functional import softmax
from ..nn import CrossEntropyLoss, Sequential, recalibrate_batchnorm
from ..optim import Optimizer
from .config import TrainConfig, has_batch_norm, make_augmentation
from .display import Progress
from .schedules import scheduled_lr
from .step import Step, compiles, stateless_forward


@dataclass
class RunState:
    """Where a run stands: completed epochs, position inside the current one, history."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def position(self) -> str:
        """Where the run stands, for messages: "after epoch 2", "at epoch 3, step 117", "before its first step"."""
        if self.step:
            return f"at epoch {self.epoch + 1}, step {self.step}"
        return f"after epoch {self.epoch}" if self.epoch else "before its first step"


class TrainingDiverged(XpcnnError, RuntimeError):
    """A training or evaluation loss, or a weight, became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run at a step boundary; ``signum`` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Trainer:
    """Fits a model with an optimiser on device-resident splits."""

    def __init__(
        self,
        model: Sequential,
        optimizer: Optimizer,
        backend: Backend,
        config: TrainConfig,
        progress: Progress | None = None,
        background: float = 0.0,
        callbacks: Sequence = (),
        eager: bool = False,
        communicator: Communicator | None = None,
        epoch_program: bool = True,
    ):
        """``background`` is the value of a blank pixel after normalisation: what augmentation fills in.

        ``callbacks`` are objects with an ``on_step(step, loss)`` method (``step`` counts optimiser
        steps from 1, ``loss`` is the batch's as a float: reading it synchronises a GPU every step),
        an ``on_epoch_end(record)`` method (the epoch's history record), or both.  A callback that
        returns True stops training after that step or epoch; an epoch stopped part-way is evaluated
        and recorded over the steps it ran.

        On JAX each chunk of ``config.log_every`` full-batch steps is one compiled program, the epoch
        program (:mod:`xpcnn.training.compiled`), or with ``epoch_program=False`` each step is one; ``eager`` runs
        the steps uncompiled.  Step callbacks, and several ranks, run step by step.

        With a ``communicator`` of several ranks (:mod:`xpcnn.backends.distributed`) each rank trains on its shard of
        every global batch of ``config.batch_size``, batch norm uses the global batch's statistics and the
        gradients are averaged before each update: the ranks train one model, the one a single process
        would.  Only rank 0 shows progress; every rank's history is the global batch's.
        """
        self.model, self.optimizer, self.backend, self.config = model, optimizer, backend, config
        self.communicator = communicator or Local()
        check_backend(backend, self.communicator.world_size)
        check_batch_size(config.batch_size, self.communicator.world_size)
        model.set_communicator(self.communicator)
        hooks = [(getattr(c, "on_step", None), getattr(c, "on_epoch_end", None)) for c in callbacks]
        for callback, (on_step, on_epoch_end) in zip(callbacks, hooks, strict=True):
            if not (callable(on_step) or callable(on_epoch_end)):
                message = f"callback {callback!r} has neither an on_step nor an on_epoch_end method"
                raise ConfigError(message, "callbacks")
        self._step_callbacks = [on_step for on_step, _ in hooks if callable(on_step)]
        self._epoch_callbacks = [on_epoch_end for _, on_epoch_end in hooks if callable(on_epoch_end)]
        # Labels are validated once, at load; the evaluation loss stays the plain cross-entropy.
        self.loss_fn = CrossEntropyLoss(check_labels=False, label_smoothing=config.label_smoothing)
        self.progress = progress if progress is not None and self.communicator.is_root else Progress(None)
        self.augmentation = make_augmentation(config)
        self._compiled_before_epoch = 0.0
        self.step_runner = step_runner(
            model,
            self.loss_fn,
            optimizer,
            backend,
            config.seed,
            self.augmentation,
            background,
            eager=eager,
            communicator=self.communicator,
        )
        self.epoch_programs = epoch_program and getattr(self.step_runner, "runs_epoch_programs", False)

    def fit(
        self, train: DeviceSplit, evals: dict[str, DeviceSplit], state: RunState | None = None, on_epoch_end=None
    ) -> RunState:
        """Train until ``config.epochs`` epochs are complete, starting from ``state``.

        After each epoch, evaluates every split in ``evals`` (e.g. ``{"val": ..., "test": ...}``),
        appends a record to ``state.history`` and calls ``on_epoch_end(state)``.
        Raises TrainingInterrupted on Ctrl-C or SIGTERM (:mod:`xpcnn.base.stopping`), with ``state`` at the
        next step to run (the caller checkpoints it), and TrainingDiverged on a non-finite loss.

        With the optimiser's ``ema`` each epoch evaluates the moving average of the weights, and the model
        ends holding it (as Keras' ``use_ema``); the optimiser's state keeps the weights it trains.
        """
        state = state or RunState()
        errors = np.errstate(over="ignore", invalid="ignore", divide="ignore")
        with stop_on_signals() as stop, errors, self.communicator.failures():
            # Ctrl-C or SIGTERM; a callback's request to stop; the signal as the ranks last agreed on it
            flag = {"stop": stop, "callback": False, "agreed": False}
            while state.epoch < self.config.epochs:
                self._agree(flag)
                if self._signalled(flag):
                    raise TrainingInterrupted(f"stopped by {stop.name} {state.position()}", stop.signum)
                finished = self._train_epoch(train, state, flag)
                if not finished and not flag["callback"]:
                    raise TrainingInterrupted(f"stopped by {stop.name} {state.position()}", stop.signum)
                record = self._end_epoch(train, evals, state)
                self.progress.end_epoch(record)
                if on_epoch_end is not None:
                    on_epoch_end(state)
                flag["callback"] |= any([callback(record) for callback in self._epoch_callbacks])
                self._agree(flag)
                if flag["callback"]:
                    break
        if self.optimizer.ema:
            self.model.set_parameters(self.optimizer.averaged_parameters())
        return state

    def _usable(self, train: DeviceSplit) -> int:
        """How many of the epoch's shuffled images are trained on (all of them, but for a short last batch
        that does not split evenly over the ranks: see :func:`xpcnn.backends.distributed.usable_count`)."""
        return usable_count(len(train), self.config.batch_size, self.communicator.world_size)

    def _signalled(self, flag: dict) -> bool:
        """Whether a stop signal stops the run here: on several ranks, only as the last all-reduce agreed, for
        a signal that came after it would stop this rank alone; the next all-reduce carries it to all."""
        return flag["stop"].requested if self.communicator.world_size == 1 else flag["agreed"]

    def _agree(self, flag: dict, totals: Sequence[float] = ()) -> list[float]:
        """``totals`` summed over the ranks, and ``flag`` made every rank's, in one all-reduce.

        A stop signal or a callback's stop on any rank stops them all: a rank that stopped alone would
        leave the others waiting at their next collective.  One process alone: ``totals`` as they are.
        """
        if self.communicator.world_size == 1:
            return list(totals)
        stop = flag["stop"]
        # Any stop but Ctrl-C (SIGTERM, rank 0's closed output pipe) stops the others as SIGTERM would.
        wishes = [stop.signum == signal.SIGINT, stop.requested and stop.signum != signal.SIGINT, flag["callback"]]
        summed = self.communicator.all_reduce_sum(np.array([*totals, *wishes], dtype=np.float64)).tolist()
        sigint, sigterm, callback = (value > 0 for value in summed[len(totals) :])
        if not stop.requested and (sigint or sigterm):
            stop.signum = signal.SIGTERM if sigterm else signal.SIGINT
        flag["callback"], flag["agreed"] = callback, sigint or sigterm
        return summed[: len(totals)]

    def _train_epoch(self, train: DeviceSplit, state: RunState, flag: dict) -> bool:
        """Run the rest of the current epoch.

        False if a stop signal or a callback stopped it (``state`` then points at the next step).
        """
        cfg, comm = self.config, self.communicator
        steps, usable = steps_per_epoch(len(train), cfg.batch_size, comm.world_size), self._usable(train)
        alone = comm.world_size == 1
        total_steps = steps * cfg.epochs
        epoch = state.epoch  # 0-based index of the running epoch
        order = self.backend.asarray(np.random.default_rng([cfg.seed, epoch]).permutation(len(train)))
        self.model.train()
        self.step_runner.start_epoch(epoch, state.step)
        self.progress.start_epoch(epoch + 1, cfg.epochs, steps, state.step)

        # The sums so far (global: a checkpoint's) start on rank 0; every rank adds its own batches.
        partial = state.partial if comm.is_root else RunState().partial
        loss_sum = self.backend.asarray(np.float64(partial["loss_sum"]))
        correct = self.backend.asarray(np.int64(partial["correct"]))
        seen, seconds = partial["seen"], state.partial["seconds"]
        self._compiled_before_epoch = compiled_before = self.step_runner.compile_seconds
        started = time.perf_counter()

        def checkpoint_partial(step: int):
            self.backend.synchronize()
            now = time.perf_counter()
            compiling = self.step_runner.compile_seconds - compiled_before  # not training time
            # The global batch's sums, and whether any rank wants to stop.
            totals = self._agree(flag, [float(loss_sum), float(correct), float(seen)])
            state.partial = {
                "loss_sum": totals[0],
                "correct": int(totals[1]),
                "seen": int(totals[2]),
                "seconds": seconds + now - started - compiling,
            }
            state.step = step
            return state.partial

        # The epoch program runs the full batches a chunk at a time (up to the next log boundary); a short
        # last batch, or every batch where step callbacks want each loss, runs as one step.
        in_programs = self.epoch_programs and not self._step_callbacks
        full_steps = usable // cfg.batch_size if in_programs else 0
        # The schedule's position from the epoch, not from the steps taken: a run resumed on another number of
        # ranks may have another number of steps an epoch (a short last batch dropped), yet is as far along.
        epoch_lrs = [scheduled_lr(cfg.schedule, cfg.lr, epoch * steps + s, total_steps) for s in range(steps)]
        lrs = self.step_runner.learning_rates(epoch_lrs) if state.step < full_steps else None
        step = state.step
        while step < steps:
            if step < full_steps:
                end = min(full_steps, (step // cfg.log_every + 1) * cfg.log_every)
                loss_sum, correct = self.step_runner.train_steps(
                    train.images, train.labels, order, lrs, step, end, cfg.batch_size, loss_sum, correct
                )
                seen += (end - step) * cfg.batch_size
            else:
                end = step + 1
                lo, hi = shard_bounds(
                    step * cfg.batch_size, min(end * cfg.batch_size, usable), comm.rank, comm.world_size
                )
                batch = order[lo:hi]
                self.optimizer.lr = epoch_lrs[step]
                loss, batch_correct = self.step_runner.train_step(train.images, train.labels, batch, step)
                if self._step_callbacks:
                    value = float(loss)
                    flag["callback"] |= any([c(state.global_step + 1, value) for c in self._step_callbacks])
                count = int(batch.shape[0])
                seen += count
                # Two launches: float64 + float32 promotes to float64.
                loss_sum = loss_sum + loss * count
                correct = correct + batch_correct
            self.optimizer.lr = epoch_lrs[end - 1]
            state.global_step += end - step
            step, last = end, end == steps
            # Several ranks stop only where they all read their sums back, so that they stop together.
            wish = alone and (flag["stop"].requested or flag["callback"])
            if step % cfg.log_every == 0 or last or wish:
                partial = checkpoint_partial(step)
                mean_loss = partial["loss_sum"] / partial["seen"]
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"loss became {mean_loss} at epoch {epoch + 1}, step {step}")
                self.progress.update(
                    step,
                    mean_loss,
                    partial["correct"] / partial["seen"],
                    partial["seen"] / max(partial["seconds"], 1e-9),
                )
                if (self._signalled(flag) or flag["callback"]) and not last:
                    return False
        return True

    def _end_epoch(self, train: DeviceSplit, evals: dict[str, DeviceSplit], state: RunState) -> dict:
        """Evaluate and record the finished epoch; after the last one, first recalibrate batch norm if asked."""
        partial = state.partial
        record = {
            "epoch": state.epoch + 1,
            "train_loss": partial["loss_sum"] / partial["seen"],
            "train_accuracy": partial["correct"] / partial["seen"],
            "lr": self.optimizer.lr,
        }
        started = time.perf_counter()
        epoch = state.epoch + 1
        xp = self.backend.xp
        flat, _ = self.optimizer.flat_state()  # one check of every weight: a program or two, not two per weight
        if flat is not None and not bool(xp.all(xp.isfinite(flat))):
            bad = [name for name, value in self.model.named_parameters() if not bool(xp.all(xp.isfinite(value)))]
            raise TrainingDiverged(f"weights became non-finite ({', '.join(bad)}) in epoch {epoch}")
        compiled_before = self.step_runner.compile_seconds
        with self._averaged_weights():
            if self.config.recalibrate_bn and epoch == self.config.epochs:  # a recipe's, on a model without: no
                record["bn_recalibrated"] = recalibrate_on(self.model, train, self.communicator)
            for name, split in evals.items():
                result = self.evaluate(split)
                if not math.isfinite(result.loss):
                    raise TrainingDiverged(f"the {name} loss became {result.loss} after epoch {epoch}")
                record[f"{name}_loss"], record[f"{name}_accuracy"] = result.loss, result.accuracy
        eval_compiling = self.step_runner.compile_seconds - compiled_before
        record["seconds"] = partial["seconds"]
        record["images_per_second"] = partial["seen"] / max(partial["seconds"], 1e-9)
        record["eval_seconds"] = time.perf_counter() - started - eval_compiling
        if self.step_runner.compiles:  # in this process: a resumed epoch compiles again
            record["compile_seconds"] = self.step_runner.compile_seconds - self._compiled_before_epoch
        state.history.append(record)
        state.epoch += 1
        state.step = 0
        state.partial = RunState().partial
        return record

    def evaluate(self, split: DeviceSplit) -> EvalResult:
        return self.step_runner.evaluate(split)

    @contextlib.contextmanager
    def _averaged_weights(self):
        """Inside, the model holds the optimiser's moving average of its weights (with ``ema``); after, the very
        arrays it trains again (so the optimiser's flat buffer stays theirs)."""
        if not self.optimizer.ema:
            yield
            return
        trained = dict(self.model.named_parameters())
        self.model.set_parameters(self.optimizer.averaged_parameters())
        try:
            yield
        finally:
            self.model.set_parameters(trained)


def host_splits(images, labels, validation, seed: int, test: tuple | None) -> tuple[tuple, dict]:
    """The training pair (images, labels) and the evaluation splits ``{"val": pair, "test": pair}`` on the host.

    ``validation``: a count or a fraction of the training images to hold out (chosen by ``seed``), 0 for none,
    or a pair of its own; ``test``: a pair, or None for none.
    """
    evals = {}
    if isinstance(validation, tuple):
        evals["val"] = validation
    elif validation:
        images, labels, val_images, val_labels = split_validation(images, labels, validation, seed)
        evals["val"] = (val_images, val_labels)
    if test is not None:
        evals["test"] = test
    return (images, labels), evals


def start_training(
    model: Sequential,
    optimizer: Optimizer,
    backend: Backend,
    config: TrainConfig,
    norm: Normalization,
    train: tuple,
    evals: dict,
    *,
    progress: Progress | None = None,
    callbacks: Sequence = (),
    eager: bool = False,
    communicator: Communicator | None = None,
    epoch_program: bool = True,
) -> tuple[Trainer, DeviceSplit, dict[str, DeviceSplit]]:
    """The set-up ``xpcnn train`` and ``xpcnn.fit`` share: rank 0's model on every rank, host splits on the
    device, and their trainer.

    ``train`` is a pair (images, labels) of host arrays and ``evals`` maps a split's name to one
    (:func:`host_splits` makes both); the images are normalised with ``norm`` on the device, in the parameters'
    dtype, and augmentation fills in the normalised blank pixel.  Call it inside ``backend.activate()``.  Returns
    (trainer, train split, evaluation splits).
    """
    ranks = communicator or Local()
    check_images_per_rank(len(train[1]), config.batch_size, ranks.world_size)
    broadcast_state(model, ranks)
    dtype = input_dtype(model)
    train_split = DeviceSplit.from_host(backend, *train, norm, dtype)
    eval_splits = {name: DeviceSplit.from_host(backend, *split, norm, dtype) for name, split in evals.items()}
    trainer = Trainer(
        model, optimizer, backend, config, progress, norm.background, callbacks, eager, communicator, epoch_program
    )
    return trainer, train_split, eval_splits


def step_runner(
    model: Sequential,
    loss_fn: CrossEntropyLoss,
    optimizer: Optimizer,
    backend: Backend,
    seed: int,
    augmentation=None,
    background: float = 0.0,
    *,
    eager: bool = False,
    communicator: Communicator | None = None,
):
    """The runner that runs each training batch, for the trainer and the benchmark alike.

    On JAX :class:`xpcnn.training.compiled.CompiledSteps`, compiled unless ``eager`` (then the same step functions
    run uncompiled); elsewhere :class:`LayerSteps`.
    """
    if backend.name != "jax":
        return LayerSteps(model, loss_fn, optimizer, backend, seed, augmentation, background, communicator)
    from .compiled import CompiledSteps

    compile = compiles(backend.name, eager)
    return CompiledSteps(model, loss_fn, optimizer, backend, seed, augmentation, background, compile, communicator)


class LayerSteps:
    """The core's training step (:class:`xpcnn.training.step.Step`) run eagerly, one dispatch per operation:
    the runner of every backend but JAX (:func:`step_runner`).

    Wraps it in place: each step reads the state from the model and optimiser and writes it back.  Noise
    for epoch ``e`` (re)started at step ``s`` comes from ``backend.generator(seed, e, s)``.
    """

    compiles = False
    compile_seconds = 0.0

    def __init__(self, model, loss_fn, optimizer, backend, seed, augmentation=None, background=0.0, communicator=None):
        """``communicator``: the ranks whose gradients each step averages (one process alone by default)."""
        self.model, self.optimizer, self.backend, self.seed = model, optimizer, backend, seed
        self.communicator = communicator or Local()
        self.step = Step(model, loss_fn, optimizer, augmentation, background, communicator=self.communicator)
        self._noise = None

    def start_epoch(self, epoch: int, step: int) -> None:
        rank = () if self.communicator.world_size == 1 else (self.communicator.rank,)
        self._noise = self.backend.generator(self.seed, epoch, step, *rank)

    def train_step(self, images, labels, batch, step: int):
        """One optimiser step on ``images[batch]`` (B, 1, 28, 28), ``labels[batch]``: (mean loss, correct) 0-d."""
        state, metrics = self.step.train(
            self.step.state(), images, labels, batch, self._noise, self.optimizer.lr, self.optimizer.steps + 1
        )
        self.step.adopt(state)
        return metrics

    def evaluate(self, split: DeviceSplit) -> EvalResult:
        return evaluate(self.model, split, self.backend)


def recalibrate_on(model: Sequential, split: DeviceSplit, communicator: Communicator | None = None) -> bool:
    """``recalibrate_bn``'s pass: ``model``'s batch-norm statistics re-estimated on ``split``'s images, up to 1,000
    at a time in order (fixed float sums; no last batch of one, which 1-d batch norm refuses), each rank on every
    image (the layers' ``communicator`` set aside: not N copies).  Whether the model has any (else nothing is read)."""
    size = next(size for size in range(1000, 0, -1) if len(split) % size != 1)
    model.set_communicator(None)
    try:
        recalibrate_batchnorm(model, (images for images, _ in split.batches(size)))
    finally:
        model.set_communicator(communicator)
    return has_batch_norm(model)


def evaluate(model: Sequential, split: DeviceSplit, backend: Backend, batch_size: int = 1000) -> EvalResult:
    """Mean loss, accuracy and host predictions of ``model`` on ``split``, in evaluation mode."""
    step = Step(model, CrossEntropyLoss(check_labels=False), optimizer=None)
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return evaluate_batches(split, backend, lambda x, y: step.evaluate(parameters, buffers, x, y), batch_size)


def predict_probabilities(model: Sequential, images, batch_size: int = 1000) -> np.ndarray:
    """Softmax probabilities (N, K) on the host for device images (N, 1, 28, 28), in evaluation mode (the
    model's own mode is left as it was).  NonFiniteOutputs where any is NaN (the model's arithmetic overflows)."""
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    chunks = []
    for i in range(0, images.shape[0], batch_size):
        batch = images[i : min(i + batch_size, images.shape[0]), ...]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # said once, below, not as warnings
            logits, _ = stateless_forward(model, parameters, buffers, batch, training=False)
            chunks.append(to_host(softmax(logits, axis=1)))
    if not all(np.isfinite(chunk).all() for chunk in chunks):
        raise NonFiniteOutputs()
    return np.concatenate(chunks)
