"""Training: fit, evaluate and predict on device-resident data, with a run directory.

The dataset is copied to the device once per run; batches are gathered there
with ``take`` from a per-epoch permutation.  The host reads values back only at
the log interval and at the end of an epoch, so a GPU is never synchronised
after every step.

Randomness is a pure function of (seed, epoch, step): epoch ``e`` shuffles
with NumPy's generator seeded ``[seed, e]`` and draws dropout noise from
``backend.generator(seed, e, s)`` where ``s`` is the step the epoch (re)started
at (on JAX, each step ``s`` from its own key, see :mod:`xpcnn.compiled`).  A
checkpoint therefore only needs the seed and the position, and resuming at an
epoch boundary continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import __version__
from .augment import Augmentation
from .backend import Backend, to_host
from .checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError, save_checkpoint
from .data import Dataset, other_files
from .errors import ConfigError, XpcnnError
from .files import remove_temporaries, write_json
from .functional import softmax
from .models import MODELS, build
from .nn import CrossEntropyLoss, Sequential, recalibrate_batchnorm
from .optim import OPTIMIZERS, SCHEDULES, SGD, Adam, Optimizer, scheduled_lr


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes."""

    dataset: str = "mnist"
    model: str = "convnet"
    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    seed: int = 0
    validation: int = 0
    augment: bool = False
    elastic: float = 0.0
    elastic_sigma: float = 4.0
    label_smoothing: float = 0.0
    recalibrate_bn: bool = False
    log_every: int = 50

    def __post_init__(self):
        checks = [  # (holds, the setting, what it must be)
            (self.model in MODELS, "model", f"unknown model {self.model!r}: expected one of {', '.join(MODELS)}"),
            (
                self.optimizer in OPTIMIZERS,
                "optimizer",
                f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}",
            ),
            (
                self.schedule in SCHEDULES,
                "schedule",
                f"unknown schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}",
            ),
            (self.epochs >= 1, "epochs", f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, "batch_size", f"batch size must be >= 1, got {self.batch_size}"),
            (
                self.lr > 0 and math.isfinite(self.lr),
                "lr",
                f"learning rate must be a positive number, got {self.lr}",
            ),
            (0 <= self.momentum < 1, "momentum", f"momentum must be in [0, 1), got {self.momentum}"),
            (
                0 <= self.weight_decay < math.inf,
                "weight_decay",
                f"weight decay must be a number >= 0, got {self.weight_decay}",
            ),
            (self.seed >= 0, "seed", f"seed must be >= 0, got {self.seed}"),
            (self.validation >= 0, "validation", f"validation size must be >= 0, got {self.validation}"),
            (self.log_every >= 1, "log_every", f"log interval must be >= 1, got {self.log_every}"),
            (
                0 <= self.label_smoothing < 1,
                "label_smoothing",
                f"label smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (
                0 <= self.elastic < math.inf,
                "elastic",
                f"elastic distortion scale must be a number >= 0, got {self.elastic}",
            ),
            (
                0 < self.elastic_sigma < math.inf,
                "elastic_sigma",
                f"elastic sigma must be a positive number, got {self.elastic_sigma}",
            ),
        ]
        for ok, setting, message in checks:
            if not ok:
                raise ConfigError(message, setting)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_optimizer(config: TrainConfig, model: Sequential) -> Optimizer:
    """The optimiser named by the config, over ``model``'s parameters."""
    if config.optimizer == "sgd":
        return SGD(
            model, config.lr, momentum=config.momentum, nesterov=config.momentum > 0, weight_decay=config.weight_decay
        )
    kind: type[Adam] = OPTIMIZERS[config.optimizer]
    return kind(model, config.lr, weight_decay=config.weight_decay)


def make_augmentation(config: TrainConfig) -> Augmentation | None:
    """The training-time augmentation the config asks for: affine (``augment``), elastic, both or none."""
    if not config.augment and not config.elastic:
        return None
    affine = {} if config.augment else {"max_shift": 0, "max_rotation": 0, "max_scale": 0, "max_shear": 0}
    return Augmentation(**affine, elastic_alpha=config.elastic, elastic_sigma=config.elastic_sigma)


@dataclass(frozen=True)
class Normalization:
    """Per-pixel affine map applied to images scaled to [0, 1]: (x - mean) / std."""

    mean: float
    std: float

    @classmethod
    def of(cls, images: np.ndarray) -> Normalization:
        """Mean and standard deviation of uint8 images, in [0, 1] units.

        Computed exactly from the histogram of the 256 pixel values, without a
        float copy of the images (which would be 376 MB for MNIST in float64).
        """
        counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
        values = np.arange(256) / 255.0
        mean = counts @ values / counts.sum()
        variance = counts @ (values - mean) ** 2 / counts.sum()
        return cls(float(mean), float(np.sqrt(variance)))


@dataclass
class DeviceSplit:
    """A labelled split on the device: images (N, 1, 28, 28) normalised floats, labels (N,) int64."""

    images: Any
    labels: Any

    def batches(self, batch_size: int):
        """(images, labels) in order, ``batch_size`` at a time (the last batch may be smaller)."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))  # the standard leaves out-of-range stops undefined
            yield self.images[start:stop, ...], self.labels[start:stop]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_host(cls, backend: Backend, images: np.ndarray, labels: np.ndarray, norm: Normalization, dtype=None):
        """Copy uint8 images (N, 28, 28) and labels (N,) to the device once, then scale there."""
        xp = backend.xp
        dtype = xp.float32 if dtype is None else dtype
        scaled = xp.astype(backend.asarray(images[:, None, :, :]), dtype)  # a new array: safe to update in place
        scaled *= 1.0 / 255.0  # in place, so the float dataset exists once (188 MB for MNIST in float32)
        scaled -= norm.mean
        scaled *= 1.0 / norm.std
        return cls(scaled, xp.astype(backend.asarray(labels), xp.int64))


def normalize_images(backend: Backend, images: np.ndarray, norm: Normalization, dtype=None):
    """Float images (N, 1, 28, 28) in [0, 1] on the host -> normalised device array."""
    xp = backend.xp
    dtype = xp.float32 if dtype is None else dtype
    return (backend.asarray(images, dtype) - norm.mean) * (1.0 / norm.std)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray  # (N,) int64, host


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


class TrainingDiverged(XpcnnError, RuntimeError):
    """A training or evaluation loss, or a weight, became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C stopped the run at a step boundary."""


class Progress:
    """Live progress on a terminal (rewritten in place), one line per epoch elsewhere."""

    def __init__(self, stream: TextIO | None = sys.stderr):
        self.stream = stream
        self.live = bool(stream is not None and stream.isatty())
        self.epoch, self._steps = 0, 1
        self._prefix = ""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self._steps = epoch, steps
        self._prefix = f"epoch {epoch}/{epochs}"

    def update(self, step: int, loss: float, accuracy: float, images_per_second: float) -> None:
        if not self.live:
            return
        width = 24
        filled = int(width * step / self._steps)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"\r{self._prefix} [{bar}] {step}/{self._steps}  loss {loss:.4f}  acc {accuracy:6.2%}  "
            f"{images_per_second:,.0f} img/s"
        )
        self.stream.flush()

    def end_epoch(self, record: dict) -> None:
        if self.stream is None:
            return
        parts = [self._prefix, f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2%}"]
        for split in ("val", "test"):
            if f"{split}_loss" in record:
                parts.append(f"{split} loss {record[f'{split}_loss']:.4f} acc {record[f'{split}_accuracy']:.2%}")
        parts.append(f"{record['seconds']:.1f} s, {record['images_per_second']:,.0f} img/s")
        if "compile_seconds" in record:
            parts.append(f"(+ {record['compile_seconds']:.1f} s compiling)")
        self.stream.write(("\r\x1b[K" if self.live else "") + "  ".join(parts) + "\n")
        self.stream.flush()


@contextlib.contextmanager
def _stop_on_ctrl_c(flag: dict):
    """Turn the first Ctrl-C into ``flag["stop"] = True``; a second one interrupts at once."""

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
        eager: bool = False,
    ):
        """``background`` is the value of a blank pixel after normalisation: what augmentation fills in.

        On JAX each step is one compiled program (:mod:`xpcnn.compiled`) unless ``eager``.
        """
        self.model, self.optimizer, self.backend, self.config = model, optimizer, backend, config
        # Labels are validated once, at load; the evaluation loss stays the plain cross-entropy.
        self.loss_fn = CrossEntropyLoss(check_labels=False, label_smoothing=config.label_smoothing)
        self.progress = progress or Progress(None)
        self.augmentation = make_augmentation(config)
        self.background = background
        self._compiled_before_epoch = 0.0
        runner = LayerSteps
        if backend.name == "jax":
            from .compiled import CompiledSteps

            runner = functools.partial(CompiledSteps, compile=not eager)
        self.step_runner = runner(model, self.loss_fn, optimizer, backend, config.seed, self.augmentation, background)

    def fit(
        self, train: DeviceSplit, evals: dict[str, DeviceSplit], state: RunState | None = None, on_epoch_end=None
    ) -> RunState:
        """Train until ``config.epochs`` epochs are complete, starting from ``state``.

        After each epoch, evaluates every split in ``evals`` (e.g. ``{"val": ..., "test": ...}``),
        appends a record to ``state.history`` and calls ``on_epoch_end(state)``.
        Raises TrainingInterrupted on Ctrl-C, with ``state`` at the next step to run (the
        caller checkpoints it), and TrainingDiverged on a non-finite loss.
        """
        state = state or RunState()
        flag = {"stop": False}
        with _stop_on_ctrl_c(flag), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            while state.epoch < self.config.epochs:
                if flag["stop"]:
                    raise TrainingInterrupted(f"stopped after epoch {state.epoch}")
                finished = self._train_epoch(train, state, flag)
                if not finished:
                    raise TrainingInterrupted(f"stopped at epoch {state.epoch + 1}, step {state.step}")
                record = self._end_epoch(train, evals, state)
                self.progress.end_epoch(record)
                if on_epoch_end is not None:
                    on_epoch_end(state)
        return state

    def steps_per_epoch(self, train: DeviceSplit) -> int:
        return math.ceil(len(train) / self.config.batch_size)

    def _train_epoch(self, train: DeviceSplit, state: RunState, flag: dict) -> bool:
        """Run the rest of the current epoch; False if Ctrl-C stopped it (``state`` then points at the next step)."""
        xp, cfg = self.backend.xp, self.config
        steps = self.steps_per_epoch(train)
        total_steps = steps * cfg.epochs
        epoch = state.epoch  # 0-based index of the running epoch
        order = self.backend.asarray(np.random.default_rng([cfg.seed, epoch]).permutation(len(train)))
        self.model.train()
        self.step_runner.start_epoch(epoch, state.step)
        self.progress.start_epoch(epoch + 1, cfg.epochs, steps)

        partial = state.partial
        loss_sum = xp.asarray(partial["loss_sum"], dtype=xp.float64, device=self.backend.device)
        correct = xp.asarray(partial["correct"], dtype=xp.int64, device=self.backend.device)
        seen, seconds = partial["seen"], partial["seconds"]
        self._compiled_before_epoch = compiled_before = self.step_runner.compile_seconds
        started = time.perf_counter()

        def checkpoint_partial(step: int):
            self.backend.synchronize()
            now = time.perf_counter()
            compiling = self.step_runner.compile_seconds - compiled_before  # not training time
            state.partial = {
                "loss_sum": float(loss_sum),
                "correct": int(correct),
                "seen": seen,
                "seconds": seconds + now - started - compiling,
            }
            state.step = step
            return state.partial

        for step in range(state.step, steps):
            batch = order[step * cfg.batch_size : min((step + 1) * cfg.batch_size, len(train))]
            self.optimizer.lr = scheduled_lr(cfg.schedule, cfg.lr, state.global_step, total_steps)
            loss, batch_correct = self.step_runner.train_step(train.images, train.labels, batch, step)
            state.global_step += 1
            count = int(batch.shape[0])
            seen += count
            # Two launches: float64 + float32 promotes to float64.
            loss_sum = loss_sum + loss * count
            correct = correct + batch_correct
            last = step + 1 == steps
            if (step + 1) % cfg.log_every == 0 or last or flag["stop"]:
                partial = checkpoint_partial(step + 1)
                mean_loss = partial["loss_sum"] / seen
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(f"loss became {mean_loss} at epoch {epoch + 1}, step {step + 1}")
                self.progress.update(
                    step + 1, mean_loss, partial["correct"] / seen, seen / max(partial["seconds"], 1e-9)
                )
                if flag["stop"] and not last:
                    return False
        self.model.zero_cache()
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
        bad = [
            name
            for name, value in self.model.parameters().items()
            if not bool(self.backend.xp.all(self.backend.xp.isfinite(value)))
        ]
        if bad:
            raise TrainingDiverged(f"weights became non-finite ({', '.join(bad)}) in epoch {epoch}")
        if self.config.recalibrate_bn and epoch == self.config.epochs:
            recalibrate_batchnorm(self.model, (images for images, _ in train.batches(1000)))
            record["bn_recalibrated"] = True
        compiled_before = self.step_runner.compile_seconds
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


class LayerSteps:
    """The training step on any backend: the layers' forward and backward, then the optimiser, one dispatch each.

    Noise for epoch ``e`` (re)started at step ``s`` comes from ``backend.generator(seed, e, s)``.
    The runner a :class:`Trainer` asks to run each batch (:class:`xpcnn.compiled.CompiledSteps` on JAX).
    """

    compiles = False
    compile_seconds = 0.0

    def __init__(self, model, loss_fn, optimizer, backend, seed, augmentation=None, background=0.0):
        self.model, self.loss_fn, self.optimizer, self.backend = model, loss_fn, optimizer, backend
        self.seed, self.augmentation, self.background = seed, augmentation, background
        self._noise = None

    def start_epoch(self, epoch: int, step: int) -> None:
        self._noise = self.backend.generator(self.seed, epoch, step)
        self.model.set_generator(self._noise)

    def train_step(self, images, labels, batch, step: int):
        """One optimiser step on ``images[batch]`` (B, 1, 28, 28), ``labels[batch]``: (mean loss, correct) 0-d."""
        xp = self.backend.xp
        x = xp.take(images, batch, axis=0)
        y = xp.take(labels, batch, axis=0)
        if self.augmentation is not None:
            x = self.augmentation(x, self._noise, fill=self.background)
        logits = self.model.forward(x)
        loss = self.loss_fn.forward(logits, y)
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        self.optimizer.step()
        return loss, xp.count_nonzero(xp.argmax(logits, axis=1) == y)  # count_nonzero counts the booleans

    def evaluate(self, split: DeviceSplit) -> EvalResult:
        return evaluate(self.model, split, self.backend)


def evaluate(model: Sequential, split: DeviceSplit, backend: Backend, batch_size: int = 1000) -> EvalResult:
    """Mean loss, accuracy and host predictions of ``model`` on ``split``, in evaluation mode."""
    xp = backend.xp
    loss_fn = CrossEntropyLoss(check_labels=False)
    model.eval()
    loss_sum = xp.asarray(0.0, dtype=xp.float64, device=backend.device)
    predictions = []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for x, y in split.batches(batch_size):
            logits = model.forward(x)
            loss_sum = loss_sum + xp.astype(loss_fn.forward(logits, y), xp.float64) * int(y.shape[0])
            predictions.append(xp.argmax(logits, axis=1))
    if not predictions:
        return EvalResult(0.0, 0.0, np.zeros(0, np.int64))
    predictions = backend.to_host(xp.concat(predictions))
    accuracy = float(np.mean(predictions == backend.to_host(split.labels)))
    return EvalResult(float(loss_sum) / len(split), accuracy, predictions)


def predict_probabilities(model: Sequential, images, batch_size: int = 1000) -> np.ndarray:
    """Softmax probabilities (N, K) on the host for device images (N, 1, 28, 28), evaluation mode."""
    model.eval()
    chunks = [
        to_host(softmax(model.forward(images[i : min(i + batch_size, images.shape[0]), ...]), axis=1))
        for i in range(0, images.shape[0], batch_size)
    ]
    return np.concatenate(chunks)


def checkpoint_config(checkpoint: Checkpoint) -> TrainConfig:
    """The training configuration a checkpoint records; CheckpointError naming its file if it is not a valid one."""
    try:
        return TrainConfig.from_dict(checkpoint.meta["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint.path}: bad configuration in the checkpoint: {exc}") from None


def model_from_checkpoint(checkpoint: Checkpoint, backend: Backend) -> tuple[Sequential, Normalization]:
    """The trained model of a checkpoint on ``backend``, and the input normalisation it expects."""
    name = checkpoint_config(checkpoint).model
    model = build(name).to(backend)
    try:
        model.load_state_dict(checkpoint.model_state)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.path}: checkpoint does not fit model {name!r}: {exc}") from None
    outputs, classes = model[-1].out_features, len(checkpoint.meta["classes"])
    if classes != outputs:
        raise CheckpointError(f"{checkpoint.path}: {classes} class names for a model with {outputs} outputs")
    return model, Normalization(**checkpoint.meta["normalization"])


# ---------------------------------------------------------------- run directories


def checkpoint_meta(
    config: TrainConfig, state: RunState, norm: Normalization, dataset: Dataset, backend: Backend
) -> dict:
    """The JSON half of a checkpoint: what was trained, on which files, how far, and how to use it."""
    return {
        "xpcnn_version": __version__,
        "config": config.to_dict(),
        "state": state.to_dict(),
        "normalization": dataclasses.asdict(norm),
        "classes": list(dataset.classes),
        "data": dataset.record(),
        "trained_on": backend.describe(),
        "rng": {
            "seed": config.seed,
            "shuffle": "epoch e: numpy default_rng([seed, e]).permutation",
            "noise": "jax: step s of epoch e: fold_in(key(seed, e), s); else epoch e started at step s: "
            "backend.generator(seed, e, s)",
        },
    }


def summary(state: RunState) -> dict:
    """Best and last test accuracy and total time of a run's history."""
    history = state.history
    best = max(history, key=lambda r: r.get("test_accuracy", -1.0)) if history else {}
    return {
        "epochs": len(history),
        "best_test_accuracy": best.get("test_accuracy"),
        "best_epoch": best.get("epoch"),
        "final_test_accuracy": history[-1].get("test_accuracy") if history else None,
        "train_seconds": sum(r["seconds"] for r in history),
    }


def run_dir_has_run(out: Path) -> bool:
    """Whether ``out`` holds a run to continue: a checkpoint, the commit point of every epoch.

    A directory without one (a run that stopped before its first epoch ended, even with a
    ``config.json`` or a ``history.json``) can be trained into afresh.
    """
    return (out / CHECKPOINT_NAME).exists()


def train_run(
    config: TrainConfig,
    backend: Backend,
    dataset,
    out: Path,
    *,
    resume: Checkpoint | None = None,
    progress: Progress | None = None,
    environment: dict | None = None,
    allow_other_data: bool = False,
    eager: bool = False,
) -> RunState:
    """Train ``config`` on ``dataset`` (an :class:`xpcnn.data.Dataset`), writing the run to ``out``.

    Resuming on training or test files other than those the run recorded (their SHA-256) is an
    error unless ``allow_other_data``.  ``eager`` turns off JAX's compiled steps.

    Writes ``config.json`` once training is about to start, then after every epoch
    ``checkpoint.npz`` and ``history.json``, all atomically.  The checkpoint is the commit
    point of an epoch: it holds the history too, and ``history.json`` follows it (and is
    written again from it on resume), so a crash or a full disk between or during any of
    the writes leaves a directory that can be resumed (or, before the first checkpoint,
    started afresh).  On Ctrl-C the current position is checkpointed before
    TrainingInterrupted propagates; on divergence the last good checkpoint is kept.
    """
    from .data import split_validation

    images, labels = dataset.train_images, dataset.train_labels
    evals_host = {}
    if config.validation:
        images, labels, val_images, val_labels = split_validation(images, labels, config.validation, config.seed)
        evals_host["val"] = (val_images, val_labels)
    evals_host["test"] = (dataset.test_images, dataset.test_labels)

    if resume is not None:
        changed = other_files(resume.meta.get("data"), dataset)
        if changed and not allow_other_data:
            raise ConfigError(
                f"{dataset.directory}: {', '.join(changed)} differ from the files the run was trained on "
                f"(in {resume.meta['data']['directory']}); allow_other_data continues on them anyway",
                "allow_other_data",
            )
        norm = Normalization(**resume.meta["normalization"])
        state = RunState(**resume.meta["state"])
    else:
        norm = Normalization.of(images)
        state = RunState()

    model = build(config.model, seed=config.seed).to(backend)
    optimizer = make_optimizer(config, model)
    if resume is not None:
        model.load_state_dict(resume.model_state)
        optimizer.load_state_dict(resume.optimizer_state)

    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)

    with backend.activate():
        train = DeviceSplit.from_host(backend, images, labels, norm)
        evals = {name: DeviceSplit.from_host(backend, *split, norm) for name, split in evals_host.items()}
        trainer = Trainer(model, optimizer, backend, config, progress, background=-norm.mean / norm.std, eager=eager)
        # Only now, with everything that can refuse the run behind us: a failed resume leaves config.json as it was.
        write_json(out / "config.json", {**config.to_dict(), **(environment or {}), "xpcnn_version": __version__})
        if resume is not None:
            write_json(out / "history.json", state.history)  # the checkpoint's, in case the last run died before it

        def save(state: RunState):
            meta = checkpoint_meta(config, state, norm, dataset, backend)
            save_checkpoint(out / CHECKPOINT_NAME, meta, model.state_dict(), optimizer.state_dict())
            write_json(out / "history.json", state.history)

        try:
            trainer.fit(train, evals, state, on_epoch_end=save)
        except TrainingInterrupted as exc:
            save(state)
            raise TrainingInterrupted(f"{exc}; checkpoint saved, continue with: xpcnn train --resume {out}") from None
        except TrainingDiverged as exc:
            kept = (
                f"the last good checkpoint (epoch {state.epoch}) is kept in {out}"
                if state.epoch
                else "no checkpoint was written"
            )
            raise TrainingDiverged(f"{exc}; {kept}; try a lower --lr") from None
    return state
