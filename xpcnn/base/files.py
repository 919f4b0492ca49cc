"""Files: opening only regular files for reading, atomic writes, outputs checked before the work, run-directory locks.

A reader sees the old file or the new one, never half of one; an error names the file the
user gave, never a temporary one; a FIFO, socket or device is refused at once, never waited on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import XpcnnError

TEMPORARY_SUFFIX = ".part"


class NotRegularFileError(XpcnnError, OSError):
    """A path that names a FIFO, socket, device or directory where a regular file was expected."""


def _kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words."""
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading, refusing at once anything but a regular file (NotRegularFileError).

    The file is opened without blocking (a FIFO with no writer would otherwise wait forever), checked
    with ``fstat`` on the open descriptor (no race between a check and the open), then set back to
    blocking reads.  Other failures are the OSError of ``open``, naming ``path``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket, or a device with nothing behind it
            raise NotRegularFileError(f"{os.fspath(path)}: not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{os.fspath(path)}: {_kind(mode)}, not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The content of the regular file ``path``; XpcnnError if it holds more than ``limit`` bytes."""
    with open_regular(path) as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise XpcnnError(f"{os.fspath(path)}: larger than {limit:,} bytes")
    return data


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` as the same kind of OSError about ``path`` (instead of a temporary file)."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, os.fspath(path))


def _temporary_prefix(name: str) -> str:
    """The start of a temporary file's name for ``name``: short enough that ``.<random>.part`` after it keeps the
    whole within the 255 bytes a file name may have, however long (and however encoded) ``name`` is."""
    return f".{name[:60]}."


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, replace: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file in ``path``'s directory that replaces ``path`` on success.

    On any error (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left untouched; an OSError names ``path``, not the temporary file.
    The new file gets mode 0644.  An existing ``path`` that is not a regular file
    (a device, a FIFO, a directory) is refused: replacing it would put a file where
    something else was.  With ``replace`` False, FileExistsError where ``path`` exists
    when the file is put in place (another process wrote it meanwhile): nothing is replaced.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise NotRegularFileError(f"{path} exists and is not a regular file: refusing to replace it")
    try:
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=TEMPORARY_SUFFIX)
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as temp:
            yield temp
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, 0o644)
        if replace:
            os.replace(temp_name, path)
        else:
            _put_new(temp_name, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        if isinstance(exc, OSError) and exc.filename in (temp_name, None):
            raise _named(exc, path) from None
        raise


def _put_new(temp_name: str, path: Path) -> None:
    """Move the file ``temp_name`` to ``path`` only if nothing is there: a hard link fails where a file exists,
    with no window between a check and the move; a file system without hard links gets the check."""
    try:
        os.link(temp_name, path)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):  # FileExistsError among them
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), temp_name) from None
        os.replace(temp_name, path)
        return
    os.unlink(temp_name)


def check_writable(path: str | os.PathLike) -> None:
    """Raise (one line, naming ``path``) unless :func:`atomic_output` could write ``path`` now.

    For outputs written after a long piece of work: a missing or read-only directory is found
    before the work, not after it.  Creates and removes one temporary file beside ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise NotRegularFileError(f"{path} exists and is not a regular file: refusing to replace it")
    if not path.parent.is_dir():
        raise XpcnnError(f"{path}: cannot write it: {path.parent} is not a directory")
    try:
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=TEMPORARY_SUFFIX)
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        os.close(fd)
    finally:  # a Ctrl-C here leaves no file behind
        os.unlink(temp_name)


def remove_temporaries(directory: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files :func:`atomic_output` left in ``directory`` for the files ``names``
    when its process was killed; returns the paths removed.

    Only ``.<name>.<random>.part`` files of those names are touched, and only by the holder of the
    directory's :func:`locked_directory` (no other xpcnn process is then writing there).
    """
    removed = []
    for name in names:
        for temp in Path(directory).glob(f"{glob.escape(_temporary_prefix(name))}*{TEMPORARY_SUFFIX}"):
            if temp.is_file() and not temp.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
                    removed.append(temp)
    return removed


class DirectoryBusyError(XpcnnError):
    """Another process holds a directory's lock."""


@contextlib.contextmanager
def locked_directory(directory: str | os.PathLike, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` itself (``flock`` on the directory) inside the block.

    DirectoryBusyError at once where another process holds it, or with ``wait`` once it lets go.  No lock
    file is written, and the lock goes with the process, so a killed run never leaves a directory locked.
    """
    directory = Path(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DirectoryBusyError(f"{directory} is in use by another xpcnn run") from None
        yield directory
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    text = json.dumps(value, indent=2) + "\n"
    with atomic_output(path) as out:
        out.write(text.encode())


def point_at_devnull(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null, so that later writes to it (a message, Python's flush at
    exit) go nowhere instead of failing again on a reader that went away; nothing for a stream without one."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, stream.fileno())
        finally:
            os.close(null)
    except (AttributeError, OSError, ValueError):  # no descriptor behind it (captured in tests), or closed
        pass
