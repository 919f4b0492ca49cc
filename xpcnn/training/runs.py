"""Run directories: training into one, resuming one, checkpoint metadata, run summaries and metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..backends.backend import Backend
from ..backends.distributed import Communicator, Local, check_images_per_rank, steps_per_epoch
from ..base.errors import ConfigError, NonFiniteOutputs, XpcnnError
from ..base.files import check_writable, locked_directory, read_regular, remove_temporaries, write_json
from ..base.stopping import stop_on_signals
from ..data.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from ..data.data import FILES, Dataset, holds_dataset, other_files
from ..data.device_data import Normalization, normalize_images
from ..data.images import Framing, framing_for
from ..models import build
from ..nn import Sequential
from ..optim import Optimizer
from .config import TrainConfig, flag, make_model, make_optimizer, require_named_model
from .display import Progress
from .train import RunState, TrainingDiverged, TrainingInterrupted, host_splits, predict_probabilities, start_training


def checkpoint_config(checkpoint: Checkpoint) -> TrainConfig:
    """The training configuration a checkpoint records; CheckpointError naming its file if it is not a valid one."""
    try:
        return TrainConfig.from_dict(checkpoint.meta["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint.path}: bad configuration in the checkpoint: {exc}") from None


def checkpoint_normalization(checkpoint: Checkpoint) -> Normalization:
    """The input normalisation a checkpoint records; CheckpointError naming its file if it is not a usable one."""
    try:
        return Normalization(**checkpoint.meta["normalization"])
    except XpcnnError as exc:
        raise CheckpointError(f"{checkpoint.path}: {exc}") from None


def picture_framing(checkpoint: Checkpoint) -> Framing:
    """How a picture is prepared for a checkpoint's model: framed as its dataset's images, in their polarity."""
    light = checkpoint_normalization(checkpoint).light_background
    return framing_for(checkpoint_config(checkpoint).dataset, light)


def model_from_checkpoint(checkpoint: Checkpoint, backend: Backend) -> tuple[Sequential, Normalization]:
    """The trained model of a checkpoint on ``backend``, and the input normalisation it expects: with ``ema``, the
    moving average of the weights (which the run evaluated), which its optimiser state keeps; else the weights.
    NonFiniteOutputs naming the file where its outputs are not finite (:func:`check_outputs`)."""
    config = checkpoint_config(checkpoint)
    require_named_model(config, checkpoint.path)
    model = build(config.model).to(backend)
    if not config.ema:
        restore(checkpoint, model)
    elif checkpoint.optimizer_state is None:
        raise CheckpointError(
            f"{checkpoint.path}: holds no optimiser state, which keeps the moving average of the weights "
            "its run was trained with (ema)"
        )
    else:
        optimizer = make_optimizer(config, model)
        restore(checkpoint, model, optimizer)
        model.set_parameters(optimizer.averaged_parameters())
    norm = checkpoint_normalization(checkpoint)
    check_outputs(model, norm, backend, str(checkpoint.path))  # which file is damaged, wherever it is used
    return model, norm


def check_outputs(model: Sequential, norm: Normalization, backend: Backend, where: str) -> None:
    """NonFiniteOutputs naming ``where`` unless the model's outputs for a blank picture and one all ink are
    finite: a damaged checkpoint (finite weights, NaN outputs) is refused before it is served or exported."""
    extremes = np.stack([np.zeros((1, 28, 28), np.float32), np.ones((1, 28, 28), np.float32)])
    with backend.activate():
        try:
            predict_probabilities(model, normalize_images(backend, extremes, norm))
        except NonFiniteOutputs:
            raise NonFiniteOutputs(where) from None


def restore(checkpoint: Checkpoint, model: Sequential, optimizer: Optimizer | None = None) -> None:
    """Load a checkpoint's weights into ``model`` (and its optimiser state into ``optimizer``), checked:
    CheckpointError naming the file where they do not fit (another model's, a missing or misshapen
    weight, a foreign optimiser slot, class names that do not match the outputs)."""
    name, weights = checkpoint_config(checkpoint).model, checkpoint.model_state
    try:
        model.load_state_dict(weights)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.path}: checkpoint does not fit model {name!r}: {exc}") from None
    outputs, classes = model[-1].out_features, len(checkpoint.meta["classes"])
    if classes != outputs:
        raise CheckpointError(f"{checkpoint.path}: {classes} class names for a model with {outputs} outputs")
    if optimizer is not None:
        if checkpoint.optimizer_state is None:
            raise CheckpointError(f"{checkpoint.path}: holds no optimiser state to continue training from")
        try:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        except ValueError as exc:
            raise CheckpointError(f"{checkpoint.path}: {exc}") from None


def check_position(checkpoint: Checkpoint, config: TrainConfig, steps_per_epoch: int) -> None:
    """CheckpointError unless the checkpoint's position in its epoch (step, images seen) is one this run reaches.

    A step at the end of the epoch is: one process stopped before a short last batch that several ranks leave
    out (fewer images than ranks), and they end the epoch there."""
    state = checkpoint.meta["state"]
    step, seen = state["step"], state["partial"]["seen"]
    if step > steps_per_epoch:
        raise CheckpointError(
            f"{checkpoint.path}: step {step} is past the end of an epoch of {steps_per_epoch} steps of these "
            "training images (a damaged checkpoint, or fewer images than the run trained on)"
        )
    if seen != step * config.batch_size:
        raise CheckpointError(f"{checkpoint.path}: {seen} images seen at step {step} of batches of {config.batch_size}")


# Settings a resumed run may change: neither alters what the finished epochs computed.
RESUMABLE = frozenset({"epochs", "log_every"})


def check_ranks_get_images(
    config: TrainConfig, dataset: Dataset, world_size: int, resume: Checkpoint | None = None, allow_other_data=False
) -> None:
    """Before the ranks start, what every rank would refuse a line apiece: ConfigError unless ``config``'s training
    split of ``dataset`` gives each of ``world_size`` ranks an image; for a ``resume``, other data
    (:func:`check_same_data`) and a position the ranks do not reach (:func:`check_position`)."""
    (_, labels), _ = host_splits(dataset.train_images, dataset.train_labels, config.validation, config.seed, None)
    check_images_per_rank(len(labels), config.batch_size, world_size)
    if resume is not None:
        check_same_data(resume, dataset, allow_other_data)
        check_position(resume, config, steps_per_epoch(len(labels), config.batch_size, world_size))


def check_same_data(checkpoint: Checkpoint, dataset: Dataset, allow: bool, files=None) -> None:
    """ConfigError (naming ``allow_other_data``) unless ``allow`` or ``dataset``'s ``files`` (default: all of
    them; e.g. ``data.TEST_FILES``) are the ones ``checkpoint``'s run recorded."""
    changed = other_files(checkpoint.meta.get("data"), dataset, *(() if files is None else (files,)))
    if changed and not allow:
        which = "files" if files is None else "test files"
        names = ", ".join(name.removesuffix(".gz") for name in changed)  # the same file gzipped or not
        raise ConfigError(
            f"{dataset.directory}: {names} differ from the {which} the run recorded "
            f"(in {checkpoint.meta['data']['directory']}); allowing other data uses them anyway",
            "allow_other_data",
        )


def check_same_task(checkpoint: Checkpoint, reference: Checkpoint) -> None:
    """ConfigError (naming ``ensemble``) unless ``checkpoint`` was trained on ``reference``'s dataset with the same
    class names: only then can their predictions be averaged."""
    dataset, expected = checkpoint_config(checkpoint).dataset, checkpoint_config(reference).dataset
    if dataset != expected:
        raise ConfigError(
            f"{checkpoint.path}: trained on {dataset}, not on {expected} as {reference.path} was", "ensemble"
        )
    if checkpoint.meta["classes"] != reference.meta["classes"]:
        raise ConfigError(f"{checkpoint.path}: its class names differ from those of {reference.path}", "ensemble")


def resumed_config(checkpoint: Checkpoint, run: Path, overrides: dict) -> TrainConfig:
    """The configuration the run in ``run`` continues with: its checkpoint's, with ``overrides``
    (settings in :data:`RESUMABLE` only) applied; ConfigError when it has nothing left to train.

    A setting given with the value the run already has is no change.  The messages state what the
    run holds (its settings, the epochs it has trained) and name the flags to ask for.
    """
    recorded = checkpoint_config(checkpoint).to_dict()
    changed = {name for name, value in overrides.items() if name in recorded and value != recorded[name]}
    fixed = sorted(changed - RESUMABLE)
    if fixed:
        trained = ", ".join(_given(name, recorded[name]) for name in fixed)
        resumable = " and ".join(flag(name) for name in sorted(RESUMABLE))
        raise ConfigError(
            f"{', '.join(map(flag, fixed))} cannot change when resuming: {run} was trained with {trained} "
            f"(of a run's settings only {resumable} can change)",
            fixed[0],
        )
    config = TrainConfig.from_dict({**recorded, **overrides})
    done = checkpoint.meta["state"]["epoch"]
    if done >= config.epochs:
        asked = f"--epochs {config.epochs} asks for no more" if "epochs" in overrides else "all it was asked for"
        raise ConfigError(
            f"{run} has already trained {done} epoch(s), {asked}: pass --epochs {done + 1} or more to train longer",
            "epochs",
        )
    return config


def _given(setting: str, value) -> str:
    """How the command line gives ``setting`` this value: ``--lr 0.01``, ``--augment`` / ``--no-augment``."""
    if isinstance(value, bool):
        return flag(setting) if value else flag(f"no_{setting}")
    if value is None:  # left to the model (its own dropout): the flag was not given
        return f"no {flag(setting)}"
    return f"{flag(setting)} {value}"


RUNS_ROOT = Path("runs")  # where runs go when no directory is named, relative to the working directory


def default_run_dir(config: TrainConfig, root: Path = RUNS_ROOT) -> Path:
    """A new, empty ``runs/<model>-<local time>`` directory, created here (``-2``, ``-3``... after the time
    where runs start in the same second): where a run goes when no directory is named."""
    stem = f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    for number in itertools.count(1):
        path = root / (stem if number == 1 else f"{stem}-{number}")
        try:
            # Atomic: of several processes, exactly one creates each name. ``parents`` (re)makes ``root``, which
            # a failed run beside this one may have removed (remove_if_empty).
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            if not root.is_dir():  # a file or a dangling link holds the name: no number would do
                raise XpcnnError(f"cannot make a run directory in {root}: it is not a directory") from None
            continue
    raise AssertionError("unreachable")


def remove_if_empty(*directories: Path) -> None:
    """Remove each of ``directories`` in turn if it is empty: the one :func:`default_run_dir` made for a run that
    stopped before it wrote anything (bad data, Ctrl-C while loading), then ``runs/`` if that run made it,
    which would otherwise stay behind as stray folders."""
    for directory in directories:
        with contextlib.suppress(OSError):  # not empty (a run wrote there), or gone
            directory.rmdir()


CONFIG_NAME, HISTORY_NAME = "config.json", "history.json"
RUN_FILES = (CONFIG_NAME, CHECKPOINT_NAME, HISTORY_NAME, "history.png")  # what a run writes into its directory


def claim_run_dir(out: Path, resume: Checkpoint | None) -> None:
    """Refuse (XpcnnError) to train in ``out`` unless it holds nothing a run would overwrite but its own files.

    Call it holding ``out``'s lock.  A new run needs a directory without a checkpoint, whose ``config.json``
    (and ``history.json``) are xpcnn's if it has any; a resumed one, the very checkpoint it resumes from,
    if ``out`` has one: another process may have continued the run since it was read.
    """
    for name in (CONFIG_NAME, HISTORY_NAME):  # a read-only directory, or a folder in a file's place, is found
        check_writable(out / name)  # before the data goes to the device and before config.json is written
    on_disk = out / CHECKPOINT_NAME
    if resume is None:
        check_no_run(out)
        written = [name for name in (CONFIG_NAME, HISTORY_NAME) if (out / name).exists()]
        if written and not _xpcnn_config(out / CONFIG_NAME):
            raise XpcnnError(f"{out} holds {', '.join(written)} that xpcnn did not write: pick another --out")
    elif on_disk.exists() and load_checkpoint(on_disk).meta["state"] != resume.meta["state"]:
        raise XpcnnError(f"{on_disk} changed since it was read (another run continued it): resume again")


def check_no_run(out: Path) -> None:
    """XpcnnError if ``out`` holds a run (:func:`run_dir_has_run`) that a new run would overwrite: how far it
    trained and how to continue it, or how to start afresh where its checkpoint cannot be read."""
    if not run_dir_has_run(out):
        return
    try:
        existing = load_checkpoint(out)
        done, planned = existing.meta["state"]["epoch"], checkpoint_config(existing).epochs
    except CheckpointError as exc:
        raise XpcnnError(
            f"{out} holds a checkpoint that cannot be continued ({exc}): remove {out / CHECKPOINT_NAME} "
            "to train afresh there, or pick another --out"
        ) from None
    more = f" --epochs {done + 1}" if done >= planned else ""
    raise XpcnnError(
        f"{out} already holds a run ({done} of its {planned} epoch(s) trained): continue it with "
        f"--resume {out}{more}, or pick another --out"
    )


def _xpcnn_config(path: Path) -> bool:
    """Whether ``path`` is a config.json that xpcnn wrote."""
    try:
        stored = json.loads(read_regular(path, 2**20))
    except (OSError, ValueError, XpcnnError):
        return False
    return isinstance(stored, dict) and "xpcnn_version" in stored and "model" in stored


def recorded_data_dir(checkpoint: Checkpoint, run: Path, files: tuple[str, ...] = FILES) -> str | None:
    """Where a run's data was: the directory its checkpoint records, while it still holds the ``files``, else
    the one its config.json names, else None (the data is then looked for as for a new run)."""
    recorded = (checkpoint.meta.get("data") or {}).get("directory")
    if recorded and holds_dataset(recorded, files):
        return recorded
    return _stored_data_dir(run)


def _stored_data_dir(run: Path) -> str | None:
    """The --data-dir a run was started with, from its config.json (None where it has no usable one)."""
    data_dir = stored_config(run).get("data_dir")
    return data_dir if isinstance(data_dir, str) else None


def ran_eagerly(run: Path) -> bool:
    """Whether the run in ``run`` last trained on JAX without compiling (``--eager``), by its config.json: a
    resume goes on so, to continue it exactly."""
    stored = stored_config(run)
    return stored.get("compiled") is False and str(stored.get("backend", "")).startswith("jax ")


def stored_config(run: Path) -> dict:
    """A run's config.json ({} where it is missing, damaged or not xpcnn's).

    The checkpoint holds everything a run needs: config.json only holds hints (the --data-dir it was started
    with, whether it compiled, its recipe), and without them a resumed run goes on as a new one would.
    """
    try:
        stored = json.loads(read_regular(run / CONFIG_NAME, 2**20))
    except (OSError, ValueError, XpcnnError):
        return {}
    return stored if isinstance(stored, dict) else {}


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
    communicator: Communicator | None = None,
    **options,
) -> RunState:
    """Train ``config`` on ``dataset`` (an :class:`xpcnn.data.data.Dataset`) into the run directory ``out``.

    The directory is created if need be (and removed again, with the parents it needed, where the run stops
    before it writes anything) and claimed for the whole run (:func:`files.locked_directory`,
    :func:`claim_run_dir`): a second run into it is refused at once, and files xpcnn did not write are
    never overwritten.  ``resume`` continues the run of that checkpoint.  Of several ranks
    (``communicator``) only rank 0 claims and writes ``out``.  ``options``: see :func:`_train_in`.
    """
    out = Path(out)
    if not (communicator or Local()).is_root:
        return _train_in(config, backend, dataset, out, resume=resume, communicator=communicator, **options)
    made = [path for path in (out, *out.parents) if not path.exists()]  # removed again if the run writes nothing
    out.mkdir(parents=True, exist_ok=True)
    with locked_directory(out):  # held, so that a run refused it (busy) removes nothing of the one holding it
        try:
            claim_run_dir(out, resume)
            remove_temporaries(out, RUN_FILES)
            return _train_in(config, backend, dataset, out, resume=resume, communicator=communicator, **options)
        finally:
            remove_if_empty(*made)


def _train_in(
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
    epoch_program: bool = True,
) -> RunState:
    """Train ``config`` on ``dataset``, writing the run to ``out`` (claimed by :func:`train_run`).

    Resuming on training or test files other than those the run recorded (their SHA-256) is an
    error unless ``allow_other_data``.  ``eager`` turns off JAX's compiled steps, ``epoch_program=False``
    its epoch programs (each step is then one program: :class:`xpcnn.training.train.Trainer`).

    Writes ``config.json`` once training is about to start, then after every epoch
    ``history.json`` and ``checkpoint.npz``, all atomically.  The checkpoint is the commit
    point of an epoch: it holds the history too, and ``history.json`` goes just before it (and
    is written again from it on resume), so a crash or a full disk between or during any of
    the writes leaves a directory that can be resumed (or, before the first checkpoint,
    started afresh).  On Ctrl-C or SIGTERM the current position is checkpointed before
    TrainingInterrupted propagates (a second SIGTERM does not stop that write; a second Ctrl-C
    abandons it, leaving the last checkpoint); on divergence the last good checkpoint is kept.

    With a ``communicator`` of several ranks every rank calls this with the same arguments: all train
    (starting from rank 0's model), only rank 0 writes to ``out``; the files are those of one process.
    """
    communicator = communicator or Local()
    test = (dataset.test_images, dataset.test_labels)
    (images, labels), evals_host = host_splits(
        dataset.train_images, dataset.train_labels, config.validation, config.seed, test
    )
    if resume is not None:
        check_same_data(resume, dataset, allow_other_data)
        norm = checkpoint_normalization(resume)
        check_position(resume, config, steps_per_epoch(len(labels), config.batch_size, communicator.world_size))
        state = RunState(**resume.meta["state"])
    else:
        norm = Normalization.of(images)
        state = RunState()

    model = make_model(config).to(backend)
    optimizer = make_optimizer(config, model)
    if resume is not None:
        restore(resume, model, optimizer)
    writes = communicator.is_root

    # The trainer's stop scope (Ctrl-C, SIGTERM), opened here to stay open while a stopped run is checkpointed.
    with backend.activate(), stop_on_signals():
        trainer, train, evals = start_training(
            model,
            optimizer,
            backend,
            config,
            norm,
            (images, labels),
            evals_host,
            progress=progress,
            eager=eager,
            communicator=communicator,
            epoch_program=epoch_program,
        )
        # Only now, with everything that can refuse the run behind us: a failed resume leaves config.json as it was.
        if writes:
            write_json(out / CONFIG_NAME, {**config.to_dict(), **(environment or {}), "xpcnn_version": __version__})
        if resume is not None and writes:
            write_json(out / HISTORY_NAME, state.history)  # the checkpoint's, in case the last run died before it

        def save(state: RunState):
            if not writes:
                return
            meta = checkpoint_meta(config, state, norm, dataset, backend)
            write_json(out / HISTORY_NAME, state.history)  # first: never behind the checkpoint of a finished run
            save_checkpoint(out / CHECKPOINT_NAME, meta, model.state_dict(), optimizer.state_dict())

        try:
            trainer.fit(train, evals, state, on_epoch_end=save)
        except TrainingInterrupted as exc:
            try:
                save(state)
            except OSError as error:  # a full disk, a directory made read-only: say the run stopped all the same
                reason = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)
                kept = f"; continue from its last with: xpcnn train --resume {out}" if run_dir_has_run(out) else ""
                raise CheckpointError(f"{exc}, but its checkpoint could not be written ({reason}){kept}") from None
            message = f"{exc}; checkpoint written to {out}; continue with: xpcnn train --resume {out}"
            raise TrainingInterrupted(message, exc.signum) from None
        except TrainingDiverged as exc:
            kept = f"the last good checkpoint (epoch {state.epoch}) is kept in {out}"
            kept = kept if state.epoch else "no checkpoint was written"
            # A resumed run keeps its learning rate: the way out is a new run with a lower one.  A weight decay
            # with lr * decay >= 1 overshoots zero at every step by itself (an unusual decay of 1 or more).
            remedy = f"a --lr below {config.lr:g}"
            if config.weight_decay >= 1 and config.lr * config.weight_decay >= 1:
                remedy = f"a --weight-decay below {1 / config.lr:g}"
            raise TrainingDiverged(f"{exc}; {kept}; start a new run with {remedy}") from None
    return state
