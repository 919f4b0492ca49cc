"""Portable checkpoints: host NumPy arrays plus JSON metadata in one ``.npz`` file.

Arrays are stored as ``model/<key>`` (a model's ``state_dict``) and
``optim/<param>/<slot>`` (optimiser state); the metadata (epoch, step, config,
RNG scheme, normalisation, history...) is a JSON document stored as the
``meta.json`` byte array.  Nothing is pickled, so a checkpoint written on a GPU
loads on any CPU and loading never runs code.  Writes are atomic.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_output

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = "xpcnn-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit."""


@dataclass
class Checkpoint:
    meta: dict
    model_state: dict[str, np.ndarray]
    optimizer_state: dict | None


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
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop("meta.json").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable xpcnn checkpoint ({_first_line(exc)})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    model_state = {k.removeprefix("model/"): v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_state = None
    if "optimizer_state" in meta:
        slots: dict[str, dict] = {}
        for key, value in arrays.items():
            if key.startswith("optim/"):
                name, slot = key.removeprefix("optim/").rsplit("/", 1)
                slots.setdefault(name, {})[slot] = value
        optimizer_state = dict(meta["optimizer_state"], state=slots)
    return Checkpoint(meta, model_state, optimizer_state)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
