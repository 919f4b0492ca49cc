"""Fetching one file by URL into place: checked against its SHA-256, bounded in bytes and in time, written
atomically (a failed fetch leaves nothing); `data` tries a dataset's mirrors with it."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import sys
import threading
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
    """Download `url` into `dest` atomically; raise DataError when the SHA-256 differs, when the body ends
    short of its Content-Length, or when the file is over `MAX_BYTES` or takes longer than `DEADLINE` (a
    broken mirror or a captive portal)."""
    digest, received = hashlib.sha256(), 0
    with _Watchdog(DEADLINE) as watchdog:
        try:
            with watchdog.opener.open(url, timeout=timeout) as response, atomic_output(dest) as out:
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
                    while chunk := response.read1(_CHUNK):
                        received += len(chunk)
                        if received > MAX_BYTES:
                            raise DataError(f"sent over {MAX_BYTES:,} bytes, more than any dataset file")
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
                watchdog.check(received)  # its cut ends the body as the server's hanging up would
                if length is not None and received < length:
                    raise DataError(f"ended after {received:,} of the {length:,} bytes it declared")
                if digest.hexdigest() != sha256:
                    raise DataError(f"SHA-256 mismatch (got {digest.hexdigest()[:16]}..., expected {sha256[:16]}...)")
        except (OSError, http.client.HTTPException, ValueError):
            watchdog.check(received)
            raise


class _Watchdog:
    """Cuts a fetch's connections when `seconds` have passed. The per-read timeout alone lets a mirror that
    sends its headers or body a byte at a time hang a run; a socket shut down from this timer's thread
    ends the read that waits on it."""

    def __init__(self, seconds: float):
        self.seconds, self.expired, self._connections = seconds, False, []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self.opener = urllib.request.build_opener(
            self._watched(urllib.request.HTTPHandler), self._watched(urllib.request.HTTPSHandler)
        )

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()

    def check(self, received: int) -> None:
        if self.expired:
            raise DataError(f"took longer than {self.seconds:g} s ({received:,} bytes received)")

    def _watched(self, handler: type) -> type:
        """`handler` (urllib's HTTP or HTTPS handler) with every connection it opens kept for `_expire`."""
        connections = self._connections

        class Watched(handler):
            def do_open(self, http_class, request, **kwargs):
                def connection(*args, **kw):
                    connections.append(made := http_class(*args, **kw))
                    return made

                return super().do_open(connection, request, **kwargs)

        return Watched

    def _expire(self) -> None:
        self.expired = True
        for connection in self._connections:
            sock = connection.sock  # once: the fetch's thread may close it meanwhile
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _declared_length(header: str | None) -> int | None:
    """A Content-Length header's byte count; None where there is none or it is not a count (http.client reads
    such a body to its end, so the download goes on without a progress bar)."""
    text = (header or "").strip()
    return int(text) if text.isascii() and text.isdigit() else None
