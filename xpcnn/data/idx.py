"""IDX files (http://yann.lecun.com/exdb/mnist/), MNIST's format, read and written as NumPy arrays: two zero
bytes, a dtype code, a dimension count, then one big-endian uint32 per dimension, then the data; gzipped or not.

Every problem with a file raises `DataError` with a one-line message that names it.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..base.errors import XpcnnError, one_line
from ..base.files import NotRegularFileError, atomic_output, open_regular

__all__ = ["MAX_IDX_BYTES", "DataError", "read_idx", "write_idx"]


class DataError(XpcnnError, ValueError):
    """A data file is missing, malformed or inconsistent (one-line message naming the file)."""


_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_IDX_DIMS = 4
_GZIP_MAGIC = b"\x1f\x8b"


# An IDX file declares its size in its header: files declaring more than this are refused before any
# decompression, and a gzip stream is never decompressed past what the header declares (plus a little, to
# count trailing bytes), so a gzip bomb stops early.
MAX_IDX_BYTES = 2**31
_TRAILING_COUNTED = 2**20


def read_idx(path: str | os.PathLike, check: Callable[[np.dtype, tuple[int, ...]], None] | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed (detected by its magic bytes) or raw.

    Returns a new, writable, native-endian array of the file's shape and
    dtype (uint8, int8, int16, int32, float32 or float64).  Reads (and
    decompresses) no more than the header declares, which may be at most
    ``MAX_IDX_BYTES``.  ``check(dtype, shape)``, given, sees the header's
    (native-endian) dtype and shape before the data is read, and raises
    DataError for a file the caller cannot use, so that such a file is
    refused from its header alone.
    """
    path = Path(path)
    try:
        with open_regular(path) as raw:
            if raw.read(2) == _GZIP_MAGIC:
                raw.seek(0)
                with gzip.GzipFile(fileobj=raw) as stream:
                    return _read_idx_stream(stream, path, check)
            raw.seek(0)
            return _read_idx_stream(raw, path, check)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: corrupt gzip stream: {one_line(error)}") from error
    except NotRegularFileError as error:
        raise DataError(str(error)) from None
    except OSError as error:
        raise DataError(f"{path}: cannot read: {one_line(error.strerror or error)}") from error


def _read_idx_stream(stream, path: Path, check) -> np.ndarray:
    """The IDX array in ``stream`` (a file or a gzip stream), reading no further than its header declares."""
    start = stream.read(4)
    if len(start) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(start)} bytes")
    if start[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file: bad magic number 0x{start.hex()}")
    code, ndim = start[2], start[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if not 1 <= ndim <= _MAX_IDX_DIMS:
        raise DataError(f"{path}: unsupported IDX dimension count {ndim} (expected 1 to {_MAX_IDX_DIMS})")
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header: {4 + len(dims)} of {4 + 4 * ndim} bytes")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    size = count * dtype.itemsize
    if size > MAX_IDX_BYTES:
        raise DataError(f"{path}: the IDX header declares {shape} items, {size:,} bytes: more than xpcnn reads")
    if check is not None:
        check(dtype.newbyteorder("="), shape)
    data = bytearray(size)  # filled in place: the file's data is held once, not as bytes and then an array
    filled = _read_into(stream, memoryview(data))
    if filled < size:
        raise DataError(f"{path}: truncated IDX file: expected {count} items, found {filled // dtype.itemsize}")
    extra = len(stream.read(_TRAILING_COUNTED))
    if extra:
        more = "at least " if extra == _TRAILING_COUNTED else ""
        raise DataError(f"{path}: {more}{extra} trailing bytes after the {count} items of the IDX file")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


_READ_CHUNK = 1 << 20  # bytes a readinto asks for: GzipFile's makes a bytes object of the whole request first


def _read_into(stream, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``stream`` (which may give less than asked for at a time); the bytes read."""
    filled = 0
    while filled < len(buffer) and (got := stream.readinto(buffer[filled : filled + _READ_CHUNK])):
        filled += got
    return filled


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` (1 to 4 dims; uint8, int8, int16, int32, float32 or float64) as IDX.

    Gzip-compressed when `path` ends in ``.gz``, raw otherwise.  The file is
    written to a temporary file and renamed into place, so `path` either keeps
    its old content or gets the complete new one.
    """
    path = Path(path)
    array = np.asarray(array)
    big_endian = array.dtype.newbyteorder(">")
    codes = [code for code, dtype in _IDX_DTYPES.items() if dtype == big_endian]
    if not codes:
        raise DataError(f"{path}: cannot store dtype {array.dtype} in an IDX file")
    if not 1 <= array.ndim <= _MAX_IDX_DIMS:
        raise DataError(f"{path}: cannot store a {array.ndim}-D array in an IDX file (1 to {_MAX_IDX_DIMS})")
    if max(array.shape) >= 2**32:
        raise DataError(f"{path}: dimension too large for an IDX file: {array.shape}")

    header = bytes([0, 0, codes[0], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = np.ascontiguousarray(array, dtype=big_endian).tobytes()
    with atomic_output(path) as out:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename=path.stem, mode="wb", fileobj=out, mtime=0) as compressed:
                compressed.write(header)
                compressed.write(payload)
        else:
            out.write(header)
            out.write(payload)
