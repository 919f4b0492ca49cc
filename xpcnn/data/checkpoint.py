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
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import XpcnnError
from ..base.files import NotRegularFileError, atomic_output, open_regular

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


# A checkpoint's arrays are checked against what the archive declares before anything is inflated: the
# largest model's state with Adam's two slots takes under 4 MB, so 256 MiB refuses only hostile files.
MAX_CHECKPOINT_BYTES = 256 * 2**20
MAX_MEMBERS = 10_000
NUMERIC_KINDS = "fiub"


def load_checkpoint(run_or_file: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; one-line CheckpointError otherwise.

    Only a regular file is opened (a FIFO or a device is refused at once); every array's size is checked
    against the archive's declarations before it is inflated; the metadata is checked key by key, and every
    number, weights and optimiser state included, must be finite.
    """
    path = checkpoint_path(run_or_file)
    if not path.exists():
        where = f"{run_or_file} holds no {CHECKPOINT_NAME}" if Path(run_or_file).is_dir() else f"{path} does not exist"
        raise CheckpointError(f"no checkpoint: {where}")
    try:
        with open_regular(path) as file:
            if not zipfile.is_zipfile(file):  # before NumPy, whose errors for other files suggest unsafe loading
                raise CheckpointError(f"{path}: not an xpcnn checkpoint (not an .npz archive)")
            arrays = _read_arrays(file)
        meta = json.loads(arrays.pop("meta.json").tobytes().decode(), parse_int=_json_int)
    except NotRegularFileError as exc:
        raise CheckpointError(str(exc)) from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable xpcnn checkpoint ({_first_line(exc)})") from None
    _check_meta(meta, path)
    unknown = sorted(key for key in arrays if not key.startswith(("model/", "optim/")))
    if unknown:
        raise CheckpointError(f"{path}: unexpected arrays {unknown}")
    infinite = sorted(key for key, value in arrays.items() if value.dtype.kind == "f" and not np.isfinite(value).all())
    if infinite:
        raise CheckpointError(f"{path}: non-finite values (NaN or infinity) in {', '.join(infinite)}")
    model_state = {k.removeprefix("model/"): v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_state = None
    slots: dict[str, dict] = {}
    for key, value in arrays.items():
        if key.startswith("optim/"):
            if "/" not in key.removeprefix("optim/"):
                raise CheckpointError(f"{path}: optimiser array {key!r} names no slot")
            name, slot = key.removeprefix("optim/").rsplit("/", 1)
            slots.setdefault(name, {})[slot] = value
    if "optimizer_state" in meta:
        optimizer_state = dict(meta["optimizer_state"], state=slots)
    elif slots:
        raise CheckpointError(f"{path}: optimiser arrays without 'optimizer_state' metadata")
    return Checkpoint(meta, model_state, optimizer_state, path)


def _read_arrays(file) -> dict[str, np.ndarray]:
    """The ``.npy`` members of the zip archive ``file``, each checked against its declared size before it is read.

    ValueError (made a CheckpointError naming the file by the caller) for anything else.
    """
    with zipfile.ZipFile(file) as archive:
        members = archive.infolist()
        if "meta.json.npy" not in archive.namelist():
            raise ValueError("an .npz archive without meta.json")
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"{len(members):,} arrays, more than a checkpoint holds")
        twice = sorted(name for name, count in Counter(archive.namelist()).items() if count > 1)
        if twice:  # which copy a reader takes is the reader's choice: refuse to guess
            raise ValueError(f"holds {', '.join(twice)} more than once")
        declared = sum(info.file_size for info in members)
        if declared > MAX_CHECKPOINT_BYTES:
            raise ValueError(f"its arrays declare {declared:,} bytes, over the limit of {MAX_CHECKPOINT_BYTES:,}")
        arrays = {}
        for info in members:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise ValueError(f"unexpected member {info.filename!r} (not an .npy array)")
            with archive.open(info) as member:
                arrays[info.filename.removesuffix(".npy")] = _read_npy_member(member, info)
        return arrays


def _read_npy_member(member, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` array: its header, then exactly the bytes its shape and dtype need (the rest of the member)."""
    version = np.lib.format.read_magic(member)
    header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if header is None:
        raise ValueError(f"{info.filename}: unsupported .npy version {version}")
    shape, fortran, dtype = header(member, max_header_size=2**16)
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"{info.filename}: dtype {dtype} is not a plain number")
    count = math.prod(shape)
    size = count * dtype.itemsize
    if size != info.file_size - member.tell():
        raise ValueError(
            f"{info.filename}: declares {shape} values ({size:,} bytes) "
            f"but holds {info.file_size - member.tell():,} bytes"
        )
    flat = np.empty(count, dtype)
    if member.readinto(flat.view(np.uint8)) != size:
        raise ValueError(f"{info.filename}: truncated")
    return flat.reshape(shape, order="F" if fortran else "C")


_STATE_KEYS = {"epoch", "step", "global_step", "partial", "history"}
_PARTIAL_KEYS = {"loss_sum", "correct", "seen", "seconds"}
_HISTORY_KEYS = {"epoch", "train_loss", "train_accuracy", "lr", "seconds"}
_HISTORY_FLAGS = {"bn_recalibrated"}  # the one value of a record that is true or false, not a number


def _json_int(text: str) -> int:
    """An integer of meta.json; ValueError beyond a float's range, where the checks of a number would overflow
    (OverflowError) rather than name the checkpoint."""
    value = int(text)
    if abs(value) > sys.float_info.max:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits in meta.json")
    return value


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _digests(value) -> bool:
    """Whether ``value`` maps names to hex digests (strings to strings)."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


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
    require(
        _count(partial["correct"]) and _count(partial["seen"]) and partial["correct"] <= partial["seen"],
        "'state.partial' counts must be integers >= 0, no more correct than seen",
    )
    require(_finite(partial["loss_sum"]) and _finite(partial["seconds"]), "'state.partial' sums must be numbers")
    history = state["history"]
    require(
        isinstance(history, list) and len(history) == state["epoch"], "'state.history' must hold a record per epoch"
    )
    for number, record in enumerate(history, 1):
        require(
            isinstance(record, dict)
            and _HISTORY_KEYS <= set(record)
            and record["epoch"] == number
            and all(isinstance(v, bool) if k in _HISTORY_FLAGS else _finite(v) for k, v in record.items()),
            f"'state.history' record {number} must hold epoch {number} and "
            f"{', '.join(sorted(_HISTORY_KEYS - {'epoch'}))} as finite numbers, {', '.join(_HISTORY_FLAGS)} as a flag",
        )
    norm = meta.get("normalization")
    require(
        isinstance(norm, dict) and set(norm) == {"mean", "std"} and _finite(norm["mean"]) and _finite(norm["std"]),
        "'normalization' must hold a finite mean and std",
    )
    require(norm["std"] > 0, "'normalization.std' must be > 0")
    classes = meta.get("classes")
    require(
        isinstance(classes, list)
        and classes
        and all(isinstance(c, str) and c.splitlines() in ([], [c]) for c in classes)
        and len(set(classes)) == len(classes),
        "'classes' must be a non-empty list of distinct names, each on one line",
    )
    if "data" in meta:  # absent from checkpoints written before runs recorded their data
        data = meta["data"]
        require(
            isinstance(data, dict)
            and isinstance(data.get("dataset"), str)
            and isinstance(data.get("directory"), str | None)
            and _digests(data.get("sha256"))
            and _digests(data.get("content_sha256", {})),  # absent from runs recorded before content digests
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
