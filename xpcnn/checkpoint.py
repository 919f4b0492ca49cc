"""Portable checkpoints: host NumPy arrays plus JSON metadata in one ``.npz`` file.

Arrays are stored as ``model/<key>`` (a model's ``state_dict``) and
``optim/<param>/<slot>`` (optimiser state); the metadata (epoch, step, config,
RNG scheme, normalisation, history...) is a JSON document stored as the
``meta.json`` byte array.  Nothing is pickled, so a checkpoint written on a GPU
loads on any CPU and loading never runs code.  Writes are atomic.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import XpcnnError
from .files import atomic_output

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = "xpcnn-checkpoint-1"


class CheckpointError(XpcnnError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit."""


@dataclass
class Checkpoint:
    meta: dict
    model_state: dict[str, np.ndarray]
    optimizer_state: dict | None
    path: Path | None = None  # the file it was read from


def checkpoint_path(run_or_file: str | os.PathLike) -> Path:
    """The checkpoint file of a run directory, or the file itself."""
    path = Path(run_or_file)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save_checkpoint(
    path: str | os.PathLike, meta: dict, model_state: dict, optimizer_state: dict | None = None
) -> None:
    """Write a checkpoint atomically.  ``optimizer_state`` is an ``Optimizer.state_dict()``."""
    meta = dict(meta, format=FORMAT)
    arrays = {f"model/{k}": np.asarray(v) for k, v in model_state.items()}
    if optimizer_state is not None:
        meta["optimizer_state"] = {"steps": optimizer_state["steps"], "lr": optimizer_state["lr"]}
        for name, slots in optimizer_state["state"].items():
            arrays.update({f"optim/{name}/{slot}": np.asarray(v) for slot, v in slots.items()})
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_output(path) as out:
        np.savez(out, **arrays)


def load_checkpoint(run_or_file: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; one-line CheckpointError otherwise."""
    path = checkpoint_path(run_or_file)
    if not path.exists():
        where = f"{run_or_file} holds no {CHECKPOINT_NAME}" if Path(run_or_file).is_dir() else f"{path} does not exist"
        raise CheckpointError(f"no checkpoint: {where}")
    if not zipfile.is_zipfile(path):  # before NumPy, whose errors for other files suggest unsafe loading
        raise CheckpointError(f"{path}: not an xpcnn checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        if "meta.json" not in arrays:
            raise KeyError("an .npz archive without meta.json")
        meta = json.loads(arrays.pop("meta.json").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable xpcnn checkpoint ({_first_line(exc)})") from None
    _check_meta(meta, path)
    bad = sorted(key for key, value in arrays.items() if value.dtype.kind not in "fiub")
    if bad:
        raise CheckpointError(f"{path}: arrays {bad} are not numeric")
    model_state = {k.removeprefix("model/"): v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_state = None
    if "optimizer_state" in meta:
        slots: dict[str, dict] = {}
        for key, value in arrays.items():
            if key.startswith("optim/"):
                name, slot = key.removeprefix("optim/").rsplit("/", 1)
                slots.setdefault(name, {})[slot] = value
        optimizer_state = dict(meta["optimizer_state"], state=slots)
    return Checkpoint(meta, model_state, optimizer_state, path)


_STATE_KEYS = {"epoch", "step", "global_step", "partial", "history"}
_PARTIAL_KEYS = {"loss_sum", "correct", "seen", "seconds"}


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_meta(meta, path: Path) -> None:
    """Raise CheckpointError naming ``path`` unless the metadata has every key a run needs, of the right type.

    The configuration's values are checked where it is used (``TrainConfig``); here, its shape.
    """

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: bad checkpoint metadata: {what}")

    require(isinstance(meta, dict), "not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    config = meta.get("config")
    require(isinstance(config, dict) and isinstance(config.get("model"), str), "'config' must name a model")
    state = meta.get("state")
    require(isinstance(state, dict) and set(state) == _STATE_KEYS, f"'state' must have the keys {sorted(_STATE_KEYS)}")
    for key in ("epoch", "step", "global_step"):
        require(_count(state[key]), f"'state.{key}' must be an integer >= 0")
    partial = state["partial"]
    require(isinstance(partial, dict) and set(partial) == _PARTIAL_KEYS, "'state.partial' is malformed")
    require(_count(partial["correct"]) and _count(partial["seen"]), "'state.partial' counts must be integers >= 0")
    require(_finite(partial["loss_sum"]) and _finite(partial["seconds"]), "'state.partial' sums must be numbers")
    require(
        isinstance(state["history"], list) and all(isinstance(r, dict) for r in state["history"]),
        "'state.history' must be a list of records",
    )
    norm = meta.get("normalization")
    require(
        isinstance(norm, dict) and set(norm) == {"mean", "std"} and _finite(norm["mean"]) and _finite(norm["std"]),
        "'normalization' must hold a finite mean and std",
    )
    require(norm["std"] > 0, "'normalization.std' must be > 0")
    classes = meta.get("classes")
    require(
        isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes),
        "'classes' must be a non-empty list of names",
    )
    if "data" in meta:  # absent from checkpoints written before runs recorded their data
        data = meta["data"]
        require(
            isinstance(data, dict)
            and isinstance(data.get("dataset"), str)
            and isinstance(data.get("directory"), str | None)
            and isinstance(data.get("sha256"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in data["sha256"].items()),
            "'data' must name the dataset, its directory and its files' SHA-256",
        )
    if "optimizer_state" in meta:
        optimizer = meta["optimizer_state"]
        require(
            isinstance(optimizer, dict) and _count(optimizer.get("steps")) and _finite(optimizer.get("lr")),
            "'optimizer_state' must hold a step count and a learning rate",
        )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
