"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import XpcnnError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file in ``path``'s directory that replaces ``path`` on success.

    On any error (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left untouched.  The new file gets mode 0644.  An existing ``path``
    that is not a regular file (a device, a FIFO, a directory) is refused: replacing
    it would put a file where something else was.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise XpcnnError(f"{path} exists and is not a regular file: refusing to replace it")
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as temp:
            yield temp
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_output` left in ``directory`` when its process was killed.

    Returns the paths removed.  Only for a directory no other process is writing to.
    """
    removed = []
    for temp in Path(directory).glob(".*.part"):
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed.append(temp)
    return removed


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    text = json.dumps(value, indent=2) + "\n"
    with atomic_output(path) as out:
        out.write(text.encode())
