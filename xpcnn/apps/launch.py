"""``xpcnn train --nproc N``: start N ranks of a command on this machine and watch them until they end.

The ranks meet through a file in a private temporary directory (no port is fixed: gloo's connections
take free ones on 127.0.0.1), each with ``XPCNN_RANK``, ``XPCNN_WORLD_SIZE`` and ``XPCNN_RENDEZVOUS`` set
(read by :func:`xpcnn.backends.distributed.rank_from_environment`) and an even share of the CPU threads.  When a
rank ends with a failure, the others get :data:`GRACE` seconds to stop by themselves (they notice a dead
peer at their next collective, a hung one after ``XPCNN_DIST_TIMEOUT``), then are killed; the launcher
says which rank failed in one line and exits with status 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE = 5.0  # seconds the other ranks get to end by themselves after one failed
POLL = 0.1  # seconds between looks at the ranks
EXIT_INTERRUPTED = 130  # a rank stopped by Ctrl-C
EXIT_TERMINATED = 143  # a rank stopped by SIGTERM
STOPPED = (EXIT_INTERRUPTED, EXIT_TERMINATED)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the operating system's choice for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        XPCNN_RENDEZVOUS=rendezvous.as_uri(),
        GLOO_SOCKET_IFNAME="lo",  # every rank is on this machine
    )
    return environ


def describe_status(status: int) -> str:
    """``exit status 1`` or ``signal 9 (SIGKILL)`` for a ``Popen.returncode``."""
    if status < 0:
        try:
            return f"signal {-status} ({signal.Signals(-status).name})"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


def launch(world_size: int, command: list[str], say=None) -> int:
    """Run ``command`` (e.g. ``[python, "-m", "xpcnn", "train", ...]``) as ranks 0..world_size-1 here; the exit
    status for the whole.

    0 when every rank succeeded, 130 when Ctrl-C stopped them (143: SIGTERM, passed on to every rank), else 1
    after ``say`` (a function of one line, stderr by default) named the first rank that failed.
    """
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="xpcnn-ranks-") as folder:
        rendezvous = Path(folder) / "rendezvous"
        ranks = []

        def stop_ranks(signum, frame):
            # Ctrl-C reaches every rank from the terminal by itself; a SIGTERM (a scheduler's, a container's)
            # is passed on.  Either way the launcher waits for the ranks to stop at a step boundary.
            if signum == signal.SIGTERM:
                for process in ranks:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)

        # A handler, not SIG_IGN: the ranks inherit an ignored signal, but not a handler.
        previous = {signum: signal.signal(signum, stop_ranks) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            coordinator = f"127.0.0.1:{free_port()}"
            for rank in range(world_size):
                environ = rank_environment(rank, world_size, rendezvous, coordinator=coordinator)
                ranks.append(subprocess.Popen(command, env=environ))
            return _watch(ranks, say)
        finally:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _watch(ranks: list[subprocess.Popen], say) -> int:
    """Wait for every rank; after the first failure, :data:`GRACE` seconds for the rest, then kill them."""
    first, failed_at = None, None  # the rank that failed first, and when it was seen
    while None in [process.poll() for process in ranks]:  # a list: poll every rank, each look
        if first is None:
            first = next((r for r, p in enumerate(ranks) if p.returncode not in (None, 0, *STOPPED)), None)
            failed_at = time.monotonic()
        elif time.monotonic() - failed_at > GRACE:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
                process.wait()
        time.sleep(POLL)
    statuses = [process.returncode for process in ranks]
    failed = [rank for rank, status in enumerate(statuses) if status not in (0, *STOPPED)]
    if not failed:
        return next((status for status in STOPPED if status in statuses), 0)
    first = failed[0] if first is None else first  # None: the failures came after the last look
    shown = ", ".join(f"rank {rank}: {describe_status(status)}" for rank, status in enumerate(statuses))
    say(f"Error: rank {first} of {len(ranks)} failed; every rank has stopped ({shown})")
    return 1


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
