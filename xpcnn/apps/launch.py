"""``xpcnn train --nproc N``: start N ranks of a command on this machine and watch them until they end.

The ranks meet through a file in a private temporary directory (no port is fixed: gloo's connections
take free ones on 127.0.0.1), each with ``XPCNN_RANK``, ``XPCNN_WORLD_SIZE`` and ``XPCNN_RENDEZVOUS`` set
(read by :func:`xpcnn.backends.distributed.rank_from_environment`) and an even share of the CPU threads.  When a
rank ends with a failure, the others get :data:`GRACE` seconds to stop by themselves (they notice a dead
peer at their next collective, a hung one after ``XPCNN_DIST_TIMEOUT``, and end with status 75), then are
killed; the launcher says which rank failed in one line (one that did not end with 75, where there is one) and
exits with status 1.

Each rank runs in a session of its own and gets signals from the launcher alone: Ctrl-C, SIGTERM, SIGHUP and
SIGQUIT are passed on to every rank once, so a ``kill -INT`` of the launcher stops the ranks as a terminal's
Ctrl-C does; Ctrl-Z suspends them with it; and a rank ends with SIGTERM (stopping at a step boundary) when its
launcher is killed outright.  After a passed-on signal, ranks still running :data:`STOP_GRACE` seconds after one
ended are killed (one waiting in torch's rendezvous hears no signal), and a second Ctrl-C kills them after
:data:`GRACE` seconds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.distributed import timeout_seconds
from ..backends.distributed_jax import port_is_free
from ..base.errors import XpcnnError
from ..base.files import locked_directory
from .exits import EXIT_BROKEN_PIPE, EXIT_HANGUP, EXIT_INTERRUPTED, EXIT_RANK_LOST, EXIT_TERMINATED

GRACE = 5.0  # seconds the other ranks get to end by themselves after one failed
STOP_GRACE = 10.0  # seconds the other ranks get to end after one stopped by a passed-on signal (rank 0 may be saving)
POLL = 0.1  # seconds between looks at the ranks
# A rank stopped by Ctrl-C, by rank 0's output reader going away, by SIGTERM or SIGHUP; the first present is the
# launcher's.
STOPPED = (EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED, EXIT_HANGUP)
PASSED_ON = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # to every rank, as they came
LAUNCHER_PID = "XPCNN_LAUNCHER_PID"  # in each rank's environment: the launcher's process id
PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def check_before_ranks(out: Path) -> None:
    """What every rank would otherwise refuse a line apiece, once before they start: ``XPCNN_DIST_TIMEOUT``, and
    ``out`` (XpcnnError where rank 0 could not make it, a file in its way, or claim it, another run holding it)."""
    timeout_seconds()
    existing = next(path for path in (out, *out.parents) if os.path.lexists(path))
    if not existing.is_dir():
        raise XpcnnError(f"{out}: {os.strerror(errno.ENOTDIR)}")
    if existing == out:
        with locked_directory(out):  # DirectoryBusyError now; rank 0 claims it again for the whole run
            pass


def free_port() -> int:
    """A port that nothing listens on now, on 127.0.0.1 (the operating system's choice for port 0) and on every
    other address (JAX's coordinator listens on all of them)."""
    for _ in range(100):  # the system's choices are free on 127.0.0.1; seldom held on another address
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port_is_free(port):
            break
    return port


def rank_environment(rank: int, world_size: int, rendezvous: Path, environ=None, coordinator: str = "") -> dict:
    """The environment of rank ``rank``: the launcher's, the rank's variables, its share of the CPU threads, and
    JAX's ``coordinator`` (host:port: JAX's processes meet over TCP, not through a file)."""
    environ = dict(os.environ if environ is None else environ)
    if coordinator:
        environ["XPCNN_COORDINATOR"] = coordinator
    threads = str(max(1, (os.cpu_count() or 1) // world_size))
    environ.setdefault("OMP_NUM_THREADS", threads)
    environ.update(
        XPCNN_RANK=str(rank),
        XPCNN_WORLD_SIZE=str(world_size),
        XPCNN_RENDEZVOUS=str(rendezvous),  # a path, not a URI: torch does not decode one (a space in TMPDIR)
        GLOO_SOCKET_IFNAME="lo",  # every rank is on this machine
    )
    return environ


def end_with_launcher(environ=None) -> None:
    """In a rank of :func:`launch`: have Linux send this process SIGTERM when the launcher ends (killed with
    SIGKILL, say), so that the ranks stop together at a step boundary and checkpoint instead of training on
    unwatched.  Nothing on other systems, or where ``XPCNN_LAUNCHER_PID`` is not a process id."""
    environ = os.environ if environ is None else environ
    launcher = environ.get(LAUNCHER_PID, "")
    if not (launcher.isdigit() and sys.platform.startswith("linux")):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    try:
        os.kill(int(launcher), 0)  # it may have ended before prctl: then no signal would come
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, OverflowError):  # not ours to signal, or no process id at all: it is not the launcher
        pass


def describe_status(status: int) -> str:
    """``exit status 1`` or ``signal 9 (SIGKILL)`` for a ``Popen.returncode``."""
    if status < 0:
        try:
            return f"signal {-status} ({signal.Signals(-status).name})"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


@dataclass
class Stopping:
    """The signals the launcher received and passed on to the ranks, in order, and when it kills ranks that are
    still running, and why: a second Ctrl-C (a person who does not want to wait), or a rank that has stopped
    while another goes on (one waiting for its partners in torch's rendezvous hears no signal)."""

    passed_on: list[int] = field(default_factory=list)
    kill_at: float | None = None
    kill_reason: str = ""  # "ranks still running {grace} s after {reason} were killed"
    killed: bool = False

    def kill_later(self, grace: float, reason: str) -> None:
        """Kill the ranks still running ``grace`` seconds from now, unless an earlier kill is due."""
        deadline = time.monotonic() + grace
        if self.kill_at is None or deadline < self.kill_at:
            self.kill_at, self.kill_reason = deadline, f"{grace:g} s after {reason}"


def launch(world_size: int, command: list[str], say=None) -> int:
    """Run ``command`` (e.g. ``[python, "-m", "xpcnn", "train", ...]``) as ranks 0..world_size-1 here; the exit
    status for the whole.

    0 when every rank succeeded; 128 + N when signal N (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT), sent to the launcher,
    was passed on to every rank and stopped them; else 1 after ``say`` (a function of one line, stderr by
    default) named the first rank that failed.  Each rank runs in a session of its own, so a signal reaches it
    only through the launcher, once: a terminal's Ctrl-C and a ``kill -INT`` of the launcher alone (an IDE's
    stop button) stop the ranks alike, at a step boundary; a second Ctrl-C stops them at once, and kills those
    still running :data:`GRACE` seconds later.  Ctrl-Z suspends the ranks with the launcher.
    """
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="xpcnn-ranks-") as folder:
        rendezvous = Path(folder) / "rendezvous"
        ranks: list[subprocess.Popen] = []
        stopping = Stopping()
        previous = _pass_signals_on(ranks, stopping)
        try:
            coordinator = f"127.0.0.1:{free_port()}"
            for rank in range(world_size):
                environ = rank_environment(rank, world_size, rendezvous, coordinator=coordinator)
                environ[LAUNCHER_PID] = str(os.getpid())
                process = subprocess.Popen(command, env=environ, start_new_session=True)
                ranks.append(process)
                for signum in stopping.passed_on:  # what came while the ranks started
                    process.send_signal(signum)
            return _watch(ranks, say, stopping)
        finally:
            _kill(ranks)
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _pass_signals_on(ranks: list[subprocess.Popen], stopping: Stopping) -> dict:
    """Handle the launcher's signals by passing them on to the live ``ranks``; the handlers they replace.

    A signal the launcher was started to ignore (Ctrl-C in a shell's background job, SIGHUP under nohup) is left
    ignored, and the ranks inherit that; they do not inherit a handler.
    """

    def live():
        return [process for process in ranks if process.poll() is None]

    def pass_on(signum, frame):
        if signum == signal.SIGINT and stopping.passed_on:
            stopping.kill_later(GRACE, "the second Ctrl-C")
        stopping.passed_on.append(signum)
        for process in live():
            process.send_signal(signum)

    def suspend(signum, frame):
        # SIGSTOP, not SIGTSTP: the ranks' process groups are orphaned (their parent is in another session),
        # and the kernel discards a terminal stop signal sent to such a group.
        stopped = live()
        for process in stopped:
            process.send_signal(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # returns once the shell continues the launcher (fg, bg)
        signal.signal(signal.SIGTSTP, suspend)
        for process in stopped:
            process.send_signal(signal.SIGCONT)

    handlers = {signum: pass_on for signum in PASSED_ON} | {signal.SIGTSTP: suspend}
    previous = {}
    for signum, handler in handlers.items():
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    return previous


def _watch(ranks: list[subprocess.Popen], say, stopping: Stopping) -> int:
    """Wait for every rank; after the first failure, :data:`GRACE` seconds for the rest, then kill them (and
    likewise when ``stopping.kill_at`` has passed).  A failure seen before a signal was passed on is reported
    even if one comes during the grace period."""
    first, failed_at = None, None  # the rank that failed first, and when it was seen
    while None in [process.poll() for process in ranks]:  # a list: poll every rank, each look
        if first is None:
            first = next((r for r, p in enumerate(ranks) if not _stopped_well(p.returncode, stopping)), None)
            failed_at = time.monotonic()
        elif time.monotonic() - failed_at > GRACE:
            _kill(ranks)
        if stopping.passed_on and any(process.returncode is not None for process in ranks):
            stopping.kill_later(STOP_GRACE, "another rank stopped")
        if stopping.kill_at is not None and time.monotonic() > stopping.kill_at:
            stopping.killed = True
            _kill(ranks)
        time.sleep(POLL)
    statuses = [process.returncode for process in ranks]
    failed = [rank for rank, status in enumerate(statuses) if not _stopped_well(status, stopping)]
    first = failed[0] if first is None and failed else first  # a failure after the last look, or none
    if first is not None and statuses[first] == EXIT_RANK_LOST:  # it lost its partner: name the partner
        first = next((rank for rank in failed if statuses[rank] != EXIT_RANK_LOST), first)
    if first is None:
        if stopping.killed:
            say(f"xpcnn: ranks still running {stopping.kill_reason} were killed")
        if not any(statuses):
            return 0
        if stopping.passed_on:
            return 128 + stopping.passed_on[0]
        return next(status for status in STOPPED if status in statuses)
    shown = ", ".join(f"rank {rank}: {describe_status(status)}" for rank, status in enumerate(statuses))
    say(f"Error: rank {first} of {len(ranks)} failed; every rank has stopped ({shown})")
    return 1


def _stopped_well(status: int | None, stopping: Stopping) -> bool:
    """Whether a rank's exit status (None: running) is no failure: a success, 130, 143 or 129 (a rank stopped by
    Ctrl-C, SIGTERM or SIGHUP), 141 (rank 0 lost the reader of its progress), or any end after a signal was passed on,
    which is the stop's doing (a rank that got Ctrl-C while it started ends with a traceback, and its partners
    with a lost peer)."""
    return status is None or status in (0, *STOPPED) or bool(stopping.passed_on)


def _kill(ranks: list[subprocess.Popen]) -> None:
    for process in ranks:
        if process.poll() is None:
            process.kill()
        process.wait()


def child_arguments(arguments: list[str], out: str) -> list[str]:
    """The command line of each rank: ``arguments`` without ``--nproc N``, with ``--out`` where neither it nor
    ``--resume`` is given (so that all ranks agree on the one run directory)."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    named = any(a in ("--out", "--resume") or a.startswith(("--out=", "--resume=")) for a in kept)
    return kept if named else [*kept, "--out", out]
