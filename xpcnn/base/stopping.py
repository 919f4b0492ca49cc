"""Stopping a run at a step boundary: Ctrl-C (SIGINT), a scheduler's SIGTERM and a closed terminal's SIGHUP (an
ssh connection that dropped), in every process of a run.

Batch schedulers (SLURM, Kubernetes, spot machines) stop a job with SIGTERM and kill it a little
later.  Inside :func:`stop_on_signals` the first SIGINT, SIGTERM or SIGHUP only records itself in a
:class:`StopRequest`; the training loop reads it at each step boundary, stops there, and the run
checkpoints its exact position.  Each process of a run (each rank of a multi-process run)
opens the same scope; a scheduler signals every rank, not necessarily at the same step, so ranks
that step together must agree on ``requested`` (any rank's) at a step boundary before they stop.
Outside the scope, :func:`termination_interrupts` makes SIGTERM and SIGHUP end a command the way Ctrl-C does,
with an exception (:class:`Terminated`), so that atomic writes clean up after themselves.  A reader of the
progress that goes away (a closed pipe) stops a run as a signal does (:func:`request_stop` with SIGPIPE).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

SIGHUP = getattr(signal, "SIGHUP", None)  # POSIX's; Windows has none
BROKEN_PIPE = getattr(signal, "SIGPIPE", 13)  # the stop a closed output pipe asks for (POSIX's SIGPIPE)
STOP_SIGNALS = tuple(signum for signum in (signal.SIGINT, signal.SIGTERM, SIGHUP) if signum is not None)
SIGNAL_NAMES = {
    signal.SIGINT: "Ctrl-C",
    signal.SIGTERM: "SIGTERM",
    SIGHUP: "SIGHUP (its terminal closed)",
    BROKEN_PIPE: "a closed output pipe",
}
REDELIVERY_DELAY = 0.01  # seconds: an interrupt Python had to drop is raised again this much later


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
    """SIGTERM or SIGHUP (``signum``) outside a stop scope: an interrupt from outside, handled wherever Ctrl-C's
    KeyboardInterrupt is."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


_active: StopRequest | None = None  # the open scope's request: a nested scope shares it


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While open, turn the first SIGINT, SIGTERM or SIGHUP into ``request.signum``; restore the previous handlers
    after.

    A second Ctrl-C interrupts at once (KeyboardInterrupt, for a person who does not want to wait).
    A later SIGTERM or SIGHUP is ignored: the run is already stopping, and its checkpoint is being written
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


def request_stop(signum: int) -> bool:
    """Have the open stop scope stop the run as signal ``signum`` would (unless a signal came first); False
    where no scope is open."""
    if _active is None:
        return False
    if _active.signum is None:
        _active.signum = signum
    return True


@contextlib.contextmanager
def termination_interrupts() -> Iterator[None]:
    """While open, SIGTERM and SIGHUP raise :class:`Terminated` (as SIGINT raises KeyboardInterrupt); restored after.

    So a scheduler's stop or a closed terminal ends a command as Ctrl-C does, its atomic writes and the folder it
    made cleaned up, where the default action would kill it on the spot.  Python runs a signal's handler between
    any two bytecodes, also inside a garbage-collector callback or a ``__del__`` (JAX has both), where it cannot
    propagate the exception: it prints it as "Exception ignored" and goes on, and the command would finish as if
    no signal had come.  While open, such a dropped interrupt is raised again :data:`REDELIVERY_DELAY` seconds
    later, by when that code has returned.  Outside the main thread, where Python delivers no signals, or where
    a signal is ignored (SIGHUP under nohup), it is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    def redeliver(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # Terminated is one
            previous_hook(unraisable)
            return
        signum = unraisable.exc_value.signum if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        # From a thread, later: raised here, the signal's handler would run inside this hook, and be dropped too.
        threading.Timer(REDELIVERY_DELAY, signal.raise_signal, (signum,)).start()

    previous_hook = sys.unraisablehook
    signals = tuple(signum for signum in (signal.SIGTERM, SIGHUP) if signum is not None)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    previous = {signum: old for signum, old in previous.items() if old is not signal.SIG_IGN}  # stays ignored
    for signum in previous:
        signal.signal(signum, handler)
    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_DFL if old is None else old)
