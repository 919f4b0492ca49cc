"""Fetching one file by URL into place: checked against its SHA-256, bounded in bytes and in time, written
atomically (a failed fetch leaves nothing); `data` tries a dataset's mirrors with it."""

from __future__ import annotations

import hashlib
import sys
import time
import urllib.request
from pathlib import Path

import click

from ..base.files import atomic_output
from .idx import DataError

TIMEOUT = 30.0  # seconds, per connection attempt and per read
DEADLINE = 900.0  # seconds for a whole file: a mirror that drips a byte at a time does not hang a run
MAX_BYTES = 64 << 20  # a file's most: over twice the largest of a known dataset (Fashion-MNIST's 26 MB)
_CHUNK = 1 << 16


def fetch(url: str, dest: Path, sha256: str, *, progress: bool, timeout: float) -> None:
    """Download `url` into `dest` atomically; raise DataError when the SHA-256 differs, or when the file is
    over `MAX_BYTES` or takes longer than `DEADLINE` (a broken mirror or a captive portal)."""
    digest = hashlib.sha256()
    deadline, received = time.monotonic() + DEADLINE, 0
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_output(dest) as out:
        length = _declared_length(response.headers.get("Content-Length"))
        if length is not None and length > MAX_BYTES:
            raise DataError(f"declares {length:,} bytes, over the {MAX_BYTES:,} of any dataset file")
        bar = click.progressbar(
            length=length or 1,
            label=f"Downloading {url}",
            hidden=not (progress and length),
            file=sys.stderr,
        )
        with bar:
            while chunk := response.read1(_CHUNK):  # one recv at a time, so the deadline is seen
                received += len(chunk)
                if received > MAX_BYTES:
                    raise DataError(f"sent over {MAX_BYTES:,} bytes, more than any dataset file")
                if time.monotonic() > deadline:
                    raise DataError(f"took longer than {DEADLINE:g} s ({received:,} bytes received)")
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise DataError(f"SHA-256 mismatch (got {digest.hexdigest()[:16]}..., expected {sha256[:16]}...)")


def _declared_length(header: str | None) -> int | None:
    """A Content-Length header's byte count; None where there is none or it is not a count (http.client reads
    such a body to its end, so the download goes on without a progress bar)."""
    text = (header or "").strip()
    return int(text) if text.isascii() and text.isdigit() else None
