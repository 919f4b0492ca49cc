"""How a command ends: one line and exit status 1 for an error a user can fix, 128 + N for signal N
(141, quietly, when the reader of its output goes away), a traceback and exit status 70 for a bug
(:func:`friendly_errors`, wrapped around each command)."""

from __future__ import annotations

import errno
import functools
import io
import os
import sys
import traceback

import click

from ..backends.distributed import RankLost, rank_from_environment
from ..base.errors import ConfigError, XpcnnError, printable
from ..base.files import point_at_devnull
from ..base.stopping import SIGNAL_NAMES, Terminated, termination_interrupts
from ..training.config import flag
from ..training.train import TrainingInterrupted

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_HANGUP = 129  # 128 + SIGHUP: the terminal closed
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of the output went away (``xpcnn predict ... | head -1``)
EXIT_BUG = 70  # sysexits' EX_SOFTWARE: an internal error
EXIT_RANK_LOST = 75  # sysexits' EX_TEMPFAIL: a rank that stopped because another died or hung (not the cause)
BUG_REPORT = "This is a bug in xpcnn: please report it, with the traceback above and the command that gave it."


def friendly_errors(command):
    """Show the errors a user can fix as one line with exit status 1 (128 + N for signal N), and bugs as bugs.

    User errors are xpcnn's own (:class:`XpcnnError`; a setting's error names its flag) and the
    operating system's (a full disk, a missing permission, memory run out).  Any other exception is a bug: its
    traceback, a request to report it, exit status 70.  ``XPCNN_DEBUG=1`` shows the traceback of
    user errors too.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with termination_interrupts():
                result = command(*args, **kwargs)
                sys.stdout.flush()  # the output written, or its failure the command's (not exit's, 120)
                return result
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except TrainingInterrupted as exc:  # stopped at a step boundary, checkpointed: 128 + the signal
            if _speaks():
                tell(f"\nxpcnn: {printable(exc)}")
            sys.exit(128 + exc.signum)
        except Terminated as exc:
            if _speaks():
                tell(f"\nxpcnn: stopped by {SIGNAL_NAMES[exc.signum]}")
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            if _speaks():
                tell("\ninterrupted")
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # quietly, as a command killed by SIGPIPE would end
            for stream in (sys.stdout, sys.stderr):  # whichever pipe closed: Python's flush at exit would fail again
                point_at_devnull(stream)
            sys.exit(EXIT_BROKEN_PIPE)
        except RankLost as exc:  # its own status, so that a launcher names the rank that failed first
            debug_traceback()
            error = click.ClickException(user_message(exc))
            error.exit_code = EXIT_RANK_LOST
            raise error from None
        except (XpcnnError, OSError, MemoryError) as exc:
            debug_traceback()
            if isinstance(exc, OSError) and _output_lost():  # a full disk under > FILE: not the command's files
                raise click.ClickException(f"cannot write the output: {exc.strerror or exc}") from None
            raise click.ClickException(user_message(exc)) from None
        except Exception:
            traceback.print_exc()
            click.echo(BUG_REPORT, err=True)
            sys.exit(EXIT_BUG)

    return wrapper


def debug_traceback() -> None:
    """The traceback of the user error being handled, on stderr, where ``XPCNN_DEBUG=1`` asks for them."""
    if os.environ.get("XPCNN_DEBUG", "") not in ("", "0"):
        traceback.print_exc()


class FriendlyGroup(click.Group):
    """A command group whose stdout is prepared before anything is written (:func:`prepare_stdout`), and whose own
    output failing (``--help`` or ``--version`` onto a full disk, written while the arguments are parsed, before
    any command's :func:`friendly_errors`) is one line and exit status 1."""

    def main(self, *args, **kwargs):
        prepare_stdout()
        # torch's C++ log, read when torch loads, would print a rendezvous's every retry with its C++ stack frames
        # before xpcnn's one line says what failed; TORCH_CPP_LOG_LEVEL=INFO shows it again.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:  # a command's own are friendly_errors': this is click's output failing
            _output_lost()  # the output's error taken, so that Python's flush at exit does not fail on it again
            tell(f"Error: cannot write the output: {exc.strerror or exc}")
            sys.exit(1)


def _output_lost() -> bool:
    """Whether standard output cannot be written (a full disk, a device's error): it is then pointed at /dev/null,
    so that Python's flush at exit does not fail on it a second time."""
    try:
        sys.stdout.flush()
        return False
    except OSError:
        point_at_devnull(sys.stdout)
        return True


def tell(line: str) -> None:
    """A line on stderr, where there is one still: after a closed pipe, a terminal that hung up or a log on a full
    disk, it is lost, and the command goes on (how a stopped command stopped: the exit status says it too)."""
    try:
        click.echo(line, err=True)
    except OSError:
        pass


def _speaks() -> bool:
    """Whether this process says how a signal stopped it: a process alone, or rank 0 of several (a launcher
    signals every rank, and they stop alike; rank 0 writes the checkpoint its line names)."""
    try:
        return rank_from_environment().rank == 0
    except XpcnnError:  # launcher variables that make no sense: this process is not one of several
        return True


def prepare_stdout() -> None:
    """stdout as every command wants it: there (:class:`ClosedOutput` where it was closed), buffered
    (:func:`buffer_unbuffered_output`), and escaping what its encoding cannot write
    (:func:`escape_unencodable_output`)."""
    if sys.stdout is None:  # started with stdout closed (>&-): Python's None would drop every write silently
        sys.stdout = ClosedOutput()
    buffer_unbuffered_output()
    escape_unencodable_output()


class ClosedOutput(io.TextIOBase):
    """stdout for a process started without one (``>&-``): a write fails as one to a closed descriptor does
    (EBADF), and so does the next flush, so that a command whose output is its result ends with one line and
    exit status 1 instead of 0; a command with nothing to say is not troubled."""

    lost = False  # whether a write failed since the last flush

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.lost = True
        raise OSError(errno.EBADF, "standard output is closed")

    def flush(self) -> None:
        if self.lost:
            self.lost = False  # once: Python's own flush at exit must not fail again
            raise OSError(errno.EBADF, "standard output is closed")


def announce(line: str) -> None:
    """A line on stdout, flushed now (an address a script waits for), lost without an error where stdout was
    closed (``serve >&-`` serves all the same)."""
    if not isinstance(sys.stdout, ClosedOutput):
        click.echo(line)
        sys.stdout.flush()


def buffer_unbuffered_output() -> None:
    """Give an unbuffered stdout (PYTHONUNBUFFERED, ``python -u``) a line buffer: its raw writes may be short, and a
    short write to a pipe whose reader went away ends the write without the error, so that a command that lost
    most of its output (``xpcnn predict ... --json | head -1``) would exit 0.  The buffer writes all or raises."""
    stream = sys.stdout
    if not isinstance(getattr(stream, "buffer", None), io.RawIOBase):  # ClosedOutput has none
        return
    encoding, errors = stream.encoding, stream.errors
    raw = stream.detach()  # the old wrapper must not close the descriptor when it is collected
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding, errors=errors, line_buffering=True)


def escape_unencodable_output() -> None:
    """Let stdout write what its encoding cannot as backslash escapes, as stderr does: a file name in a legacy
    encoding or a checkpoint's class name with a lone surrogate would otherwise fail a command at its output."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # detached or closed
            pass


def user_message(exc: Exception) -> str:
    """One line for a user error: a setting's flag first, an OS error's file and reason."""
    if isinstance(exc, ConfigError) and exc.setting:
        return f"{flag(exc.setting)}: {_first_line(exc)}"
    if isinstance(exc, MemoryError):  # the machine's limit, not xpcnn's bug: a smaller batch or dataset may fit
        return f"out of memory: {_first_line(exc)}"
    if isinstance(exc, OSError) and exc.strerror:
        target = f"{printable(exc.filename)}: " if exc.filename else ""
        return f"{target}{exc.strerror}"
    return _first_line(exc)


def _first_line(exc: Exception) -> str:
    """The message's first line; all of an xpcnn error's, whose lines break only where a name it quotes has a
    newline (written as an escape, as are other control characters, so that a name forges no line)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return printable(text if isinstance(exc, XpcnnError) else text.splitlines()[0])
