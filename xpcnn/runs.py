"""Run directories: training into one, resuming one, checkpoint metadata, run summaries and metrics."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from . import __version__
from .backend import Backend
from .checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError, save_checkpoint
from .config import TrainConfig, make_optimizer
from .data import Dataset, holds_dataset, other_files
from .device_data import DeviceSplit, Normalization
from .distributed import Communicator, Local, broadcast_state
from .display import Progress
from .errors import ConfigError
from .files import remove_temporaries, write_json
from .models import build
from .nn import Sequential
from .train import RunState, Trainer, TrainingDiverged, TrainingInterrupted


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


# Settings a resumed run may change: neither alters what the finished epochs computed.
RESUMABLE = frozenset({"epochs", "log_every"})


def resumed_config(checkpoint: Checkpoint, run: Path, overrides: dict) -> TrainConfig:
    """The configuration the run in ``run`` continues with: its checkpoint's, with ``overrides``
    (settings in :data:`RESUMABLE` only) applied; ConfigError when it has nothing left to train."""
    fixed = sorted(set(overrides) - RESUMABLE)
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot change when resuming", fixed[0])
    config = TrainConfig.from_dict({**checkpoint_config(checkpoint).to_dict(), **overrides})
    if checkpoint.meta["state"]["epoch"] >= config.epochs:
        raise ConfigError(
            f"{run} already finished {config.epochs} epoch(s); ask for more epochs to train longer", "epochs"
        )
    return config


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<model>-<local time>``: where a run goes when no directory is named."""
    return Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def recorded_data_dir(checkpoint: Checkpoint, run: Path) -> str | None:
    """Where a run's data was: the directory its checkpoint records, while it still holds the files, else
    the one its config.json names, else None (the data is then looked for as for a new run)."""
    recorded = (checkpoint.meta.get("data") or {}).get("directory")
    if recorded and holds_dataset(recorded):
        return recorded
    return _stored_data_dir(run)


def _stored_data_dir(run: Path) -> str | None:
    """The --data-dir a run was started with, from its config.json (None where it has no usable one).

    The checkpoint holds everything else a run needs: a config.json that is missing, damaged or not
    xpcnn's only loses this hint, and the data is then looked for as for a new run.
    """
    try:
        stored = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    data_dir = stored.get("data_dir") if isinstance(stored, dict) else None
    return data_dir if isinstance(data_dir, str) else None


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) int64 counts: rows the true class, columns the predicted one."""
    flat = labels.astype(np.int64) * classes + predictions
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """(classes,) share of each true class predicted right (0 for a class with no images)."""
    return confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)


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
    communicator: Communicator | None = None,
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

    With a ``communicator`` of several ranks every rank calls this with the same arguments: all train
    (starting from rank 0's model), only rank 0 writes to ``out``; the files are those of one process.
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
    communicator = communicator or Local()
    broadcast_state(model, communicator)
    writes = communicator.is_root

    if writes:
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)

    with backend.activate():
        train = DeviceSplit.from_host(backend, images, labels, norm)
        evals = {name: DeviceSplit.from_host(backend, *split, norm) for name, split in evals_host.items()}
        trainer = Trainer(
            model,
            optimizer,
            backend,
            config,
            progress,
            background=-norm.mean / norm.std,
            eager=eager,
            communicator=communicator,
        )
        # Only now, with everything that can refuse the run behind us: a failed resume leaves config.json as it was.
        if writes:
            write_json(out / "config.json", {**config.to_dict(), **(environment or {}), "xpcnn_version": __version__})
        if resume is not None and writes:
            write_json(out / "history.json", state.history)  # the checkpoint's, in case the last run died before it

        def save(state: RunState):
            if not writes:
                return
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
