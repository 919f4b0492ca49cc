"""Stopping a run at a step boundary: Ctrl-C (SIGINT) and a scheduler's SIGTERM, in every process of a run.

Batch schedulers (SLURM, Kubernetes, spot machines) stop a job with SIGTERM and kill it a little
later.  Inside :func:`stop_on_signals` the first SIGINT or SIGTERM only records itself in a
:class:`StopRequest`; the training loop reads it at each step boundary, stops there, and the run
checkpoints its exact position.  Each process of a run (each rank of a multi-process run)
opens the same scope; a scheduler signals every rank, not necessarily at the same step, so ranks
that step together must agree on ``requested`` (any rank's) at a step boundary before they stop.
Outside the scope, :func:`sigterm_interrupts` makes SIGTERM end a command the way Ctrl-C does,
with an exception (:class:`Terminated`), so that atomic writes clean up after themselves.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@dataclass
class StopRequest:
    """The first stop signal a scope received (None: none yet)."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """How a person knows the signal: "Ctrl-C", "SIGTERM"."""
        return SIGNAL_NAMES.get(self.signum, f"signal {self.signum}")


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a stop scope: an interrupt from outside, handled wherever Ctrl-C's KeyboardInterrupt is."""


_active: StopRequest | None = None  # the open scope's request: a nested scope shares it


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While open, turn the first SIGINT or SIGTERM into ``request.signum``; restore the previous handlers after.

    A second Ctrl-C interrupts at once (KeyboardInterrupt, for a person who does not want to wait).
    A second SIGTERM is ignored: the run is already stopping, and its checkpoint is being written
    (a scheduler that will not wait kills the process, and the atomic writes keep the files whole).
    A scope opened inside another shares its request, so that a caller can keep the handlers
    through the checkpoint it writes after the loop stopped.  Outside the main thread, where
    Python delivers no signals, the request stays empty and the signals are left alone; so is a
    signal that is ignored (``SIG_IGN``).
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    if _active is not None:
        yield _active
        return
    request = StopRequest()

    def handler(signum, frame):
        if request.signum is None:
            request.signum = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    # A signal the process was started to ignore (SIGINT in a shell's background job, nohup) stays ignored.
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    previous = {signum: old for signum, old in previous.items() if old is not signal.SIG_IGN}
    try:
        for signum in previous:
            signal.signal(signum, handler)
        _active = request
        yield request
    finally:
        _active = None
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_DFL if old is None else old)  # None: a handler not set from Python


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While open, SIGTERM raises :class:`Terminated` (as SIGINT raises KeyboardInterrupt); restored after.

    Outside the main thread, where Python delivers no signals, or where it is ignored, SIGTERM is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # as stop_on_signals: an ignored signal stays ignored
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
