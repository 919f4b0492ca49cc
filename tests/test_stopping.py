"""Stopping at a step boundary on Ctrl-C or a scheduler's SIGTERM: the scope, the library, a real `xpcnn train`."""

import errno
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import InterruptAt, run_onto_a_full_disk, started_server

import xpcnn
from xpcnn.apps import cli
from xpcnn.apps.cli import main
from xpcnn.backends.backend import get_backend
from xpcnn.base.files import atomic_output
from xpcnn.base.stopping import Terminated, request_stop, stop_on_signals, termination_interrupts
from xpcnn.data.checkpoint import CheckpointError, load_checkpoint
from xpcnn.training import runs
from xpcnn.training.config import TrainConfig
from xpcnn.training.train import TrainingInterrupted

REPOSITORY = Path(__file__).resolve().parents[1]


class Killed(Exception):
    """What the test's own SIGTERM handler raises: the signal reached the handler from before training."""


@pytest.fixture
def sigterm_raises():
    """A SIGTERM handler of the test's own, which training must set aside and then put back."""

    def handler(signum, frame):
        raise Killed

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, previous)


def test_the_first_signal_is_recorded_a_second_sigterm_ignored_a_second_ctrl_c_interrupts(sigterm_raises):
    sigint_before = signal.getsignal(signal.SIGINT)
    with stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert (stop.requested, stop.signum, stop.name) == (True, signal.SIGTERM, "SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises
    assert signal.getsignal(signal.SIGINT) is sigint_before


@pytest.fixture
def hang_ups_at_their_default():
    """SIGHUP as in a terminal, also where the tests run under nohup (which ignores it, and an ignored signal stays
    ignored)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_a_hang_up_stops_as_sigterm_does(sigterm_raises, hang_ups_at_their_default):
    """A closed terminal (an ssh connection that dropped): the run stops at a step boundary and checkpoints."""
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        assert (stop.signum, stop.name) == (signal.SIGHUP, "SIGHUP (its terminal closed)")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGHUP


def test_a_nested_scope_shares_the_request_and_only_the_outer_restores(sigterm_raises):
    with stop_on_signals() as outer:
        with stop_on_signals() as inner:
            assert inner is outer
        os.kill(os.getpid(), signal.SIGTERM)  # still the scope's handler after the inner one closed
        assert outer.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises


def test_handlers_are_restored_when_the_scope_ends_with_an_error(sigterm_raises):
    with pytest.raises(RuntimeError), stop_on_signals():
        raise RuntimeError
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises


def test_outside_the_main_thread_signals_are_left_alone(sigterm_raises):
    seen = []

    def run():
        with stop_on_signals() as stop:
            seen.append((stop.requested, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert seen == [(False, sigterm_raises)]


def blobs(n=200, seed=0):
    rng = np.random.default_rng(seed)
    prototypes = (np.random.default_rng(99).random((10, 28, 28)) > 0.7) * 200.0
    labels = rng.integers(0, 10, n)
    return np.clip(prototypes[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255).astype(np.uint8), labels


def test_fit_stops_at_the_step_boundary_after_a_sigterm(sigterm_raises):
    class SigtermAtStep3:
        def on_step(self, step, loss):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match=r"^stopped by SIGTERM at epoch 1, step 3$") as stopped:
        xpcnn.fit("seed", blobs(), epochs=1, batch_size=20, backend="numpy", callbacks=[SigtermAtStep3()])
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises


def test_a_second_sigterm_while_the_stopped_run_is_checkpointed_does_not_stop_the_write(
    synthetic, tmp_path, monkeypatch, sigterm_raises
):
    written = []
    real_save = runs.save_checkpoint

    def save_after_another_sigterm(path, meta, *args):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's second SIGTERM, while the position is written
        real_save(path, meta, *args)
        written.append(meta["state"]["step"])

    monkeypatch.setattr(runs, "save_checkpoint", save_after_another_sigterm)
    config = TrainConfig(model="seed", epochs=1, batch_size=50, optimizer="adam", lr=5e-3, log_every=1)
    run = tmp_path / "run"
    stopped = rf"^stopped by SIGTERM at epoch 1, step 4; checkpoint written to {re.escape(str(run))}"
    with pytest.raises(TrainingInterrupted, match=stopped):
        runs.train_run(config, get_backend("numpy"), synthetic, run, progress=InterruptAt(1, 4, signal.SIGTERM))
    assert written == [4] and load_checkpoint(run).meta["state"]["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises


@pytest.mark.parametrize("epochs_before", [0, 1])
def test_a_stop_whose_checkpoint_cannot_be_written_says_it_stopped_and_what_is_kept(
    synthetic, tmp_path, monkeypatch, sigterm_raises, epochs_before
):
    """A full disk (or a directory made read-only) just as the stop's checkpoint is written: one error that says
    the run stopped, why its position is lost, and whether an earlier checkpoint is there to continue from."""
    real_save = runs.save_checkpoint

    def full_disk_when_stopping(path, meta, *args):
        if meta["state"]["step"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, meta, *args)

    monkeypatch.setattr(runs, "save_checkpoint", full_disk_when_stopping)
    config = TrainConfig(model="seed", epochs=2, batch_size=50, optimizer="adam", lr=5e-3, log_every=1)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as failed:
        progress = InterruptAt(epochs_before + 1, 2, signal.SIGTERM)
        runs.train_run(config, get_backend("numpy"), synthetic, run, progress=progress)
    where = f"at epoch {epochs_before + 1}, step 2"
    expected = f"stopped by SIGTERM {where}, but its checkpoint could not be written ({run / 'checkpoint.npz'}: "
    expected += "No space left on device)"
    expected += f"; continue from its last with: xpcnn train --resume {run}" if epochs_before else ""
    assert str(failed.value) == expected


def test_a_stop_before_the_first_step_says_so(sigterm_raises):
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # as one that came while the run was set up
        with pytest.raises(TrainingInterrupted, match=r"^stopped by SIGTERM before its first step$"):
            xpcnn.fit("seed", blobs(), epochs=1, batch_size=20, backend="numpy")


TRAIN = ["train", "--model", "lenet", "--epochs", "2", "--batch-size", "10", "--optimizer", "adam", "--lr", "0.002"]
TRAIN += ["--device", "cpu", "--backend", "numpy", "--log-every", "1"]
STOPPED = re.compile(
    r"^xpcnn: stopped by SIGTERM (at epoch \d, step \d+|after epoch 1); checkpoint written to (.+); "
    r"continue with: xpcnn train --resume (.+)$"
)


def test_a_sigterm_to_xpcnn_train_checkpoints_the_position_exits_143_and_resume_ends_as_a_straight_run(
    synthetic_dir, tmp_path
):
    """A real SIGTERM (then a second, as an impatient scheduler sends) to a real process, mid-epoch; lenet has
    no dropout, so a mid-epoch resume continues bit for bit (with dropout, only the noise would differ)."""
    run = tmp_path / "stopped"
    process = started_training(synthetic_dir, run, stdout=subprocess.PIPE)
    watchdog = threading.Timer(120, process.kill)  # a hard limit, whatever happens
    watchdog.start()
    try:
        for line in process.stderr:  # 60 steps an epoch, one plain line each
            if line.startswith("epoch 1/2 step 2/"):
                process.send_signal(signal.SIGTERM)
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    message = STOPPED.match(stderr.strip().splitlines()[-1])
    assert message and message[2] == message[3] == str(run), stderr
    state = load_checkpoint(run).meta["state"]
    assert state["global_step"] < 2 * 60 and not list(run.glob(".*.part"))

    assert CliRunner().invoke(main, ["train", "--resume", str(run), "--quiet"]).exit_code == 0
    straight = tmp_path / "straight"
    result = CliRunner().invoke(main, [*TRAIN, "--data-dir", str(synthetic_dir), "--out", str(straight), "--quiet"])
    assert result.exit_code == 0, result.output
    resumed, expected = load_checkpoint(run), load_checkpoint(straight)
    for key, value in expected.model_state.items():
        assert np.array_equal(resumed.model_state[key], value), key
    assert resumed.optimizer_state["steps"] == expected.optimizer_state["steps"] == 2 * 60
    resumed_history, straight_history = (json.loads((path / "history.json").read_text()) for path in (run, straight))
    assert list(map(without_timings, resumed_history)) == list(map(without_timings, straight_history))


def started_training(synthetic_dir: Path, run: Path, stdout) -> subprocess.Popen:
    """A real ``xpcnn train`` of TRAIN into ``run``, its progress on a pipe (one plain line a step)."""
    return subprocess.Popen(
        [sys.executable, "-m", "xpcnn", *TRAIN, "--data-dir", str(synthetic_dir), "--out", str(run)],
        cwd=REPOSITORY,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in {"seconds", "eval_seconds", "images_per_second"}}


def test_outside_training_a_termination_interrupts_as_ctrl_c_does(sigterm_raises):
    with pytest.raises(Terminated), termination_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises


def test_outside_training_a_sighup_interrupts_too_and_ends_the_command_with_129(tmp_path, monkeypatch):
    """A terminal closed while the data loaded killed train by SIGHUP's default action, leaving the runs/ folder
    it had made; it now ends as SIGTERM does, with the folder removed."""
    previous = signal.getsignal(signal.SIGHUP)
    with pytest.raises(Terminated) as stopped, termination_interrupts():
        os.kill(os.getpid(), signal.SIGHUP)
    assert stopped.value.signum == signal.SIGHUP and signal.getsignal(signal.SIGHUP) is previous

    def hang_up(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)  # the signal's exception comes first

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_dataset", hang_up)
    result = CliRunner().invoke(main, ["train", "--model", "seed", "--device", "cpu"])
    assert result.exit_code == 129 and "stopped by SIGHUP" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_python_drops_inside_a_gc_callback_is_raised_again(sigterm_raises):
    """JAX's garbage-collector callback: a SIGTERM's handler that runs inside it raises where Python can only print
    "Exception ignored" and go on; the scope raises it again a moment later, in the command's own code."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(100))  # bytecodes: the handler runs here, inside the callback

    gc.callbacks.append(callback)
    try:
        with pytest.raises(Terminated), termination_interrupts():
            gc.collect()
            assert fired
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        gc.callbacks.remove(callback)
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises


def test_request_stop_asks_the_open_scope_only_and_never_overrides_a_signal():
    assert not request_stop(signal.SIGPIPE)
    with stop_on_signals() as stop:
        assert request_stop(signal.SIGPIPE) and (stop.signum, stop.name) == (signal.SIGPIPE, "a closed output pipe")
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert request_stop(signal.SIGPIPE) and stop.signum == signal.SIGINT


def test_a_closed_progress_pipe_stops_xpcnn_train_with_a_checkpoint_and_status_141(synthetic_dir, tmp_path):
    """``xpcnn train 2>&1 | head``, or a ``tee`` that the same Ctrl-C killed first: the run stops at its next step
    boundary and checkpoints there, quietly, as SIGPIPE would end it; then it resumes."""
    run = tmp_path / "run"
    process = started_training(synthetic_dir, run, stdout=subprocess.DEVNULL)
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    try:
        for line in process.stderr:
            if line.startswith("epoch 1/2 step 2/"):
                break
        process.stderr.close()  # the reader goes away
        process.wait(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    assert process.returncode == 141
    state = load_checkpoint(run).meta["state"]
    assert 2 <= state["global_step"] < 2 * 60 and not list(run.glob(".*.part"))
    assert CliRunner().invoke(main, ["train", "--resume", str(run), "--quiet"]).exit_code == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="a device that is always full")
def test_a_log_on_a_full_disk_loses_its_lines_not_the_run(synthetic_dir, tmp_path):
    """train's first lines (what it trains, its notes) were written without the progress's care: stderr on a full
    disk ended the command with status 1 before the run began."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "xpcnn", *TRAIN, "--data-dir", str(synthetic_dir), "--out", str(run)]
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=full, timeout=120)
    assert result.returncode == 0
    assert load_checkpoint(run).meta["state"]["epoch"] == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="a device that is always full")
@pytest.mark.parametrize(
    "command",
    [["info"], ["train", "--model", "seed", "--epochs", "1", "-q"], ["--help"], ["--version"], ["train", "--help"]],
)
def test_output_to_a_full_disk_is_one_line_and_exit_1(command, synthetic_dir, tmp_path):
    """> FILE on a full disk: the failure is the command's, one line and 1, not Python's at exit (120, with an
    'Exception ignored' traceback); a run is saved all the same.  Help and version text are written while the
    arguments are parsed, before any command runs: the same."""
    trains = command[0] == "train" and "--help" not in command
    if trains:
        command += ["--data-dir", str(synthetic_dir), "--out", str(tmp_path / "run")]
    result = run_onto_a_full_disk(command, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == ["Error: cannot write the output: No space left on device"]
    if trains:
        assert load_checkpoint(tmp_path / "run").meta["state"]["epoch"] == 1


@pytest.mark.parametrize(
    "command",
    [["info"], ["train", "--model", "seed", "--epochs", "1", "-q"], ["--version"], ["train", "--help"]],
)
def test_output_to_a_closed_stdout_is_one_line_and_exit_1(command, synthetic_dir, tmp_path):
    """>&-: Python's sys.stdout is None, and click dropped every line, so a command whose output is its result
    exited 0 having said nothing; a run is saved all the same."""
    trains = command[0] == "train" and "--help" not in command
    if trains:
        command += ["--data-dir", str(synthetic_dir), "--out", str(tmp_path / "run")]
    closed = ["bash", "-c", 'exec "$0" -m xpcnn "$@" >&-', sys.executable, *command]  # no preexec_fn: no fork
    result = subprocess.run(closed, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == ["Error: cannot write the output: standard output is closed"]
    if trains:
        assert load_checkpoint(tmp_path / "run").meta["state"]["epoch"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal's hang-up as Linux gives it")
def test_a_terminal_that_hangs_up_stops_xpcnn_train_with_a_checkpoint_and_status_129(synthetic_dir, tmp_path):
    """An ssh connection that drops: the kernel sends SIGHUP and writes to the terminal fail (EIO). Before, the
    run died by the signal and lost everything since its last epoch."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "xpcnn", *TRAIN, "--data-dir", str(synthetic_dir), "--out", str(run)]
    terminal, its_side = os.openpty()  # the side this test holds, and the side the child's terminal is
    # The child: a session of its own (start_new_session) that takes the terminal as its controlling one by
    # opening it, with SIGHUP at its default (as in a terminal, also under nohup), then xpcnn in its place.
    # Not pty.fork or a preexec_fn: this process has JAX's threads, and Python code between fork and exec could
    # deadlock on their locks.
    take_the_terminal = (
        "import os, signal, sys; fd = os.open(sys.argv[1], os.O_RDWR); [os.dup2(fd, i) for i in (0, 1, 2)]; "
        "signal.signal(signal.SIGHUP, signal.SIG_DFL); os.execv(sys.argv[2], sys.argv[2:])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    child = subprocess.Popen(
        [sys.executable, "-c", take_the_terminal, os.ttyname(its_side), *command],
        cwd=REPOSITORY,
        env=env,
        start_new_session=True,
    )
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    try:
        shown = b""
        while b"epoch 1/2 2/60" not in shown:  # the live bar, two steps in
            shown += os.read(terminal, 4096)
        os.close(terminal)  # the terminal hangs up
        child.wait()
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()
        os.close(its_side)  # held until now: with no side open, reading this test's side fails at once
    assert child.returncode == 128 + signal.SIGHUP
    state = load_checkpoint(run).meta["state"]
    assert 2 <= state["global_step"] < 2 * 60 and not list(run.glob(".*.part"))


def test_a_sigterm_before_training_ends_the_command_in_one_line_and_leaves_no_temporary_file(
    tmp_path, monkeypatch, sigterm_raises
):
    """As while a dataset downloads: the atomic write in progress removes its temporary file."""

    def download_interrupted(*args, **kwargs):
        with atomic_output(tmp_path / "train-images-idx3-ubyte.gz") as out:
            out.write(b"part of a download")
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli, "load_dataset", download_interrupted)
    result = CliRunner().invoke(main, ["train", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 143, result.output
    assert result.output.strip().splitlines() == ["xpcnn: stopped by SIGTERM"]
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is sigterm_raises


def test_a_sigterm_stops_xpcnn_serve_as_ctrl_c_does(synthetic_dir, tmp_path):
    run = tmp_path / "run"
    train = ["train", "--model", "seed", "--batch-size", "100", "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(main, [*train, "--data-dir", str(synthetic_dir), "--out", str(run)]).exit_code == 0
    process = started_server(run)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving "), line
        address = line.split(" at http://")[1].split("/")[0]
        urllib.request.urlopen(f"http://{address}/", timeout=10).close()  # the server is serving by now
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    assert stderr.strip().splitlines()[-1] == "stopped"


@pytest.mark.parametrize("scope", [stop_on_signals, termination_interrupts])
def test_an_ignored_sigterm_stays_ignored(scope):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with scope():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("rank, said", [("0", ["xpcnn: stopped by SIGTERM"]), ("1", [])])
def test_of_several_ranks_stopped_by_a_signal_only_rank_0_says_so(monkeypatch, rank, said):
    """A launcher signals every rank and they stop alike: one line for the run, not one per rank."""
    import click

    from xpcnn.apps.exits import friendly_errors

    @click.command()
    @friendly_errors
    def stopped():
        raise Terminated

    monkeypatch.setenv("XPCNN_RANK", rank)
    monkeypatch.setenv("XPCNN_WORLD_SIZE", "2")
    monkeypatch.setenv("XPCNN_RENDEZVOUS", "/nonexistent/rendezvous")
    result = CliRunner().invoke(stopped)
    assert result.exit_code == 143
    assert result.output.strip().splitlines() == said
