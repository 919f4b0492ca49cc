"""Data-parallel training with real ranks: processes on 127.0.0.1 meeting through torch.distributed (gloo).

Every multi-process run here is started in its own session with a hard timeout, after which its whole
process group is killed: no test can hang.  2 ranks with global batch B train the same model as one
process with batch B (float64, batch norm synchronised), the run directory of a 2-rank run resumes on 1
rank and back, and a rank killed mid-epoch stops the others with one line and a usable checkpoint.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch.distributed")

from dp_worker import train  # noqa: E402 - after the skip
from helpers import write_synthetic_mnist  # noqa: E402

from xpcnn.backends.distributed import Local  # noqa: E402
from xpcnn.base.files import locked_directory  # noqa: E402
from xpcnn.data.checkpoint import load_checkpoint  # noqa: E402
from xpcnn.training.schedules import scheduled_lr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dp_worker.py"
TIMEOUT = 120  # seconds: a hard limit on every multi-process run
pytestmark = pytest.mark.slow


def run(command: list[str], timeout: float = TIMEOUT, environ: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` in a new session; after ``timeout`` seconds kill its whole process group and fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XPCNN_DIST_TIMEOUT": "20", **(environ or {})}
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"{command} ran past {timeout} s and was killed")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def launched(world_size: int, command: list[str]) -> list[str]:
    """``command`` run as ``world_size`` ranks by xpcnn's launcher."""
    launcher = f"import sys; from xpcnn.apps.launch import launch; sys.exit(launch({world_size}, {command!r}))"
    return [sys.executable, "-c", launcher]


def xpcnn(*arguments) -> list[str]:
    return [sys.executable, "-m", "xpcnn", *map(str, arguments)]


def relative(a, b) -> float:
    scale = max(float(np.max(np.abs(b))), 1e-300)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale


# ---------------------------------------------------------------- the same model as one process


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batch-norm"])
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_two_ranks_train_the_model_one_process_trains(tmp_path, backend, batch_norm):
    """Global batch 32 over 2 ranks against batch 32 in one process: 8 steps (2 epochs, a short last batch)."""
    kind = "BN" if batch_norm else "PLAIN"
    out = str(tmp_path / "rank{rank}.npz")
    result = run(launched(2, [sys.executable, str(WORKER), backend, kind, "2", out]))
    assert result.returncode == 0, result.stderr
    expected = train(backend, batch_norm, 2, Local())
    assert any(".running_var" in name for name in expected) == batch_norm
    for rank in range(2):
        got = dict(np.load(out.format(rank=rank)))
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            assert relative(got[name], value) <= 1e-10, (rank, name, relative(got[name], value))


# ---------------------------------------------------------------- the command line


@pytest.fixture
def data_dir(synthetic_dir):
    return synthetic_dir


def test_nproc_trains_writes_one_run_directory_and_resumes_on_another_count(tmp_path, data_dir):
    out = tmp_path / "run"
    common = ["--data-dir", data_dir, "--model", "convnet-bn", "--batch-size", 64, "--device", "cpu", "-q"]
    two = run(xpcnn("train", *common, "--epochs", 1, "--out", out, "--nproc", 2))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("best test accuracy") == 1  # rank 0 alone speaks
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "config.json", "history.json"]
    first = load_checkpoint(out)
    assert first.meta["state"]["epoch"] == 1
    one = run(xpcnn("train", "--resume", out, "--epochs", 2, "--nproc", 1, "-q"))
    assert one.returncode == 0, one.stderr
    assert load_checkpoint(out).meta["state"]["epoch"] == 2
    back = run(xpcnn("train", "--resume", out, "--epochs", 3, "--nproc", 2, "-q"))
    assert back.returncode == 0, back.stderr
    history = load_checkpoint(out).meta["state"]["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3]


def test_jax_ranks_recalibrate_batch_norm_together(tmp_path, data_dir):
    """Recalibration runs eagerly, outside the compiled step, each rank on every training image (every rank once
    failed there after its last epoch, its all-reduce given JAX arrays, and the epoch was lost)."""
    out = tmp_path / "run"
    common = ["--data-dir", data_dir, "--model", "lenet-bn", "--batch-size", 64, "--device", "cpu", "-q"]
    result = run(
        xpcnn("train", *common, "--backend", "jax", "--recalibrate-bn", "--epochs", 1, "--out", out, "--nproc", 2)
    )
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out).meta["state"]["history"][0]["bn_recalibrated"] is True


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_any_rank_starts(tmp_path, data_dir):
    result = run(xpcnn("train", "--data-dir", data_dir, "--batch-size", 63, "--out", tmp_path / "r", "--nproc", 2))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --batch-size: a global batch of 63 does not split evenly over 2 ranks"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "fault, expected",
    [
        ("file-in-the-way", "afile/run: Not a directory"),
        ("run-in-use", "run is in use by another xpcnn run"),
        ("bad-timeout", "XPCNN_DIST_TIMEOUT must be a number of seconds"),
    ],
)
def test_what_every_rank_would_refuse_is_refused_once_before_they_start(tmp_path, data_dir, fault, expected):
    """Before, each rank said it, and the others that rank 0's failure stopped said a broadcast failed."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / ("afile/run" if fault == "file-in-the-way" else "run")
    if fault == "run-in-use":
        out.mkdir()
    environ = {"XPCNN_DIST_TIMEOUT": "0"} if fault == "bad-timeout" else None
    with locked_directory(out) if fault == "run-in-use" else contextlib.nullcontext():
        result = run(xpcnn("train", "--data-dir", data_dir, "--out", out, "--nproc", 2), environ=environ)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_a_run_resumed_on_another_number_of_ranks_keeps_its_place_in_the_schedule(tmp_path):
    """65 images in batches of 64: one process takes 2 steps an epoch, two ranks 1 (the short batch has fewer
    images than ranks). The schedule went by the steps taken, so the resumed epochs ran past its end at lr 0."""
    data = write_synthetic_mnist(tmp_path / "data", n_train=65, n_test=20)
    out = tmp_path / "run"
    common = ["--data-dir", data, "--model", "lenet", "--device", "cpu", "--schedule", "cosine", "-q"]
    assert run(xpcnn("train", *common, "--epochs", 2, "--out", out)).returncode == 0
    resumed = run(xpcnn("train", "--resume", out, "--epochs", 4, "--nproc", 2, "-q"))
    assert resumed.returncode == 0, resumed.stderr
    lrs = [record["lr"] for record in load_checkpoint(out).meta["state"]["history"]]
    assert lrs[2:] == pytest.approx([scheduled_lr("cosine", 0.05, epoch, 4) for epoch in (2, 3)], rel=1e-12)
    assert min(lrs) > 0


def test_one_process_stopped_before_a_batch_two_ranks_leave_out_resumes_on_them(tmp_path):
    """65 images in batches of 64, stopped after step 1: one process would take the short last batch as step 2;
    two ranks leave it out (one image, two ranks), and were refused (a line apiece) as at a step past the epoch's
    end. They end the epoch there. What every rank would refuse, other data here, is said once."""
    from helpers import InterruptAt

    from xpcnn.backends.backend import get_backend
    from xpcnn.data.data import load_dataset
    from xpcnn.training.config import TrainConfig
    from xpcnn.training.runs import train_run
    from xpcnn.training.train import TrainingInterrupted

    data = write_synthetic_mnist(tmp_path / "data", n_train=65, n_test=20)
    out = tmp_path / "run"
    config = TrainConfig(model="lenet", epochs=2, log_every=1)
    with pytest.raises(TrainingInterrupted):
        train_run(config, get_backend("numpy"), load_dataset("mnist", data), out, progress=InterruptAt(1, 1))
    stopped = load_checkpoint(out).meta["state"]
    assert (stopped["epoch"], stopped["step"], stopped["partial"]["seen"]) == (0, 1, 64)
    other = write_synthetic_mnist(tmp_path / "other", n_train=65, n_test=20, seed=9)
    refused = run(xpcnn("train", "--resume", out, "--data-dir", other, "--nproc", 2, "-q"))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "differ from the files the run recorded" in refused.stderr
    resumed = run(xpcnn("train", "--resume", out, "--data-dir", data, "--nproc", 2, "-q"))
    assert resumed.returncode == 0, resumed.stderr
    history = load_checkpoint(out).meta["state"]["history"]
    assert [record["epoch"] for record in history] == [1, 2]
    assert history[0]["train_loss"] == pytest.approx(stopped["partial"]["loss_sum"] / 64, rel=1e-12)
    assert history[0]["lr"] == pytest.approx(scheduled_lr("onecycle", 0.05, 0, 2), rel=1e-12)  # its one step's


def test_ranks_that_do_not_meet_say_so_in_one_line(tmp_path, data_dir):
    """torch's C++ log printed each retry of the rendezvous with some 15 C++ stack frames before it."""
    from xpcnn.apps.launch import free_port

    env = {name: value for name, value in os.environ.items() if name != "TORCH_CPP_LOG_LEVEL"}
    env |= {"PYTHONPATH": str(ROOT), "XPCNN_DIST_TIMEOUT": "1", "RANK": "1", "WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # no rank 0 there
    command = xpcnn("train", "--data-dir", data_dir, "--device", "cpu", "-q", "--out", tmp_path / "run")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True)
    assert result.returncode == 75
    assert result.stderr.splitlines() == [
        next(line for line in result.stderr.splitlines() if "the 2 ranks did not all meet within 1 s" in line)
    ], result.stderr


def test_an_eager_jax_run_resumes_compiled_on_two_ranks(tmp_path, data_dir):
    """The ranks read the run's --eager from its checkpoint, as one process does, and refused to run eagerly."""
    pytest.importorskip("jax")
    out = tmp_path / "run"
    common = ["--data-dir", data_dir, "--model", "lenet", "--backend", "jax", "--device", "cpu", "-q"]
    assert run(xpcnn("train", *common, "--eager", "--out", out)).returncode == 0
    resumed = run(xpcnn("train", "--resume", out, "--epochs", 2, "--nproc", 2, "-q"))
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out).meta["state"]["epoch"] == 2


# ---------------------------------------------------------------- faults


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("fault", ["killed", "hung"])
@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_a_rank_that_dies_or_hangs_stops_the_others_with_one_line(tmp_path, data_dir, backend, fault):
    out = tmp_path / "run"
    command = xpcnn(
        "train", "--data-dir", data_dir, "--model", "seed", "--batch-size", 8, "--epochs", 500, "--out", out,
        "--backend", backend, "--device", "cpu", "--nproc", 2, "-q",
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XPCNN_DIST_TIMEOUT": "5"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint.npz").exists():  # an epoch is done: stop rank 1 in a later one
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first epoch"
            time.sleep(0.1)
        ranks = _children(process.pid)
        os.kill(ranks[1], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 1
    assert took < 5 + 5 + 10  # XPCNN_DIST_TIMEOUT, the launcher's grace, start-up slack
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: rank ") and "every rank has stopped" in lines[-1]
    if backend != "jax":  # JAX's coordination service may end a rank first, with a fatal log of its own
        assert any("another rank died or did not answer" in line for line in lines), err
        assert lines[-1].startswith("Error: rank 1 of 2 failed") and "rank 0: exit status 75" in lines[-1], err
        assert not any("Traceback" in line for line in lines), err
    assert load_checkpoint(out).meta["state"]["epoch"] >= 1  # the last checkpoint is whole
    resumed = run(xpcnn("train", "--resume", out, "--epochs", load_checkpoint(out).meta["state"]["epoch"] + 1, "-q"))
    assert resumed.returncode == 0, resumed.stderr


def _end_everything(process: subprocess.Popen, ranks: list[int]) -> None:
    """After a failed test: kill the launcher's process group and its ranks (each in a session of its own)."""
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    if process.stderr is not None and not process.stderr.closed:
        process.communicate()
    process.wait()


def _state(pid: int) -> str:
    """A process's state letter from /proc (R, S, T for stopped, ...); "gone" once it has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def _wait_until(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# Runs a command with Ctrl-C and SIGHUP at their defaults, as in a terminal's job, also where the tests run in the
# background or under nohup (which ignore them, and an exec keeps that). Not a preexec_fn: this process has JAX's
# threads, and Python code between fork and exec could deadlock on their locks.
AS_AT_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.signal(signal.SIGHUP, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def _started(out: Path, epochs: int, *, new_group: bool = False, quiet: bool = True) -> subprocess.Popen:
    """``xpcnn train --nproc 2`` of ``epochs`` short epochs into ``out``, once its first checkpoint is written."""
    command = xpcnn(
        "train", "--data-dir", os.environ["XPCNN_TEST_DATA"], "--model", "seed", "--batch-size", 8,
        "--epochs", epochs, "--out", out, "--device", "cpu", "--nproc", 2, "--log-every", 5, *["-q"] * quiet,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XPCNN_DIST_TIMEOUT": "20"}
    # A process group in the test's session, or a session of its own (as a terminal's job is, or not)
    where = {"process_group": 0} if new_group else {"start_new_session": True}
    command = [sys.executable, "-c", AS_AT_A_TERMINAL, *map(str, command)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, **where)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoint.npz").exists():  # an epoch is done: the ranks are training
        if process.poll() is not None or time.monotonic() > deadline:
            _end_everything(process, [])
            pytest.fail("the run ended or stalled before its first epoch")
        time.sleep(0.1)
    return process


@pytest.fixture
def data_env(data_dir, monkeypatch):
    monkeypatch.setenv("XPCNN_TEST_DATA", str(data_dir))


def _resumes(out: Path) -> None:
    state = load_checkpoint(out).meta["state"]
    resumed = run(xpcnn("train", "--resume", out, "--epochs", state["epoch"] + 1, "-q"))
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("how", ["terminal-ctrl-c", "ctrl-c-to-the-launcher", "sigterm"])
def test_a_stop_signal_stops_every_rank_together_and_the_run_resumes(tmp_path, data_env, how):
    """A terminal's Ctrl-C (to the launcher's process group), a ``kill -INT`` of the launcher alone (an IDE's
    stop button), a scheduler's SIGTERM: the launcher passes each on once, every rank stops at the same step,
    rank 0 checkpoints, 128 + the signal."""
    out = tmp_path / "run"
    process = _started(out, 50)
    ranks = _children(process.pid)
    try:
        if how == "terminal-ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT if how == "ctrl-c-to-the-launcher" else signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        _end_everything(process, ranks)
    signum = signal.SIGTERM if how == "sigterm" else signal.SIGINT
    assert process.returncode == 128 + signum, err
    assert err.count("; continue with: xpcnn train --resume") == 1 and "Traceback" not in err, err  # rank 0's
    assert all(_state(pid) == "gone" for pid in ranks)
    _resumes(out)


def test_a_second_ctrl_c_kills_the_ranks_that_do_not_stop(tmp_path, data_env):
    """Rank 1 stopped (SIGSTOP) cannot stop by itself, and rank 0 waits for it in a collective: a second Ctrl-C
    kills both GRACE seconds later, well inside the 20 s XPCNN_DIST_TIMEOUT, and says so."""
    from xpcnn.apps.launch import GRACE

    out = tmp_path / "run"
    process = _started(out, 500)
    ranks = _children(process.pid)
    try:
        os.kill(ranks[1], signal.SIGSTOP)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        _end_everything(process, ranks)
    assert process.returncode == 130, err
    assert GRACE <= took < GRACE + 5, took
    assert err.strip().splitlines()[-1] == "xpcnn: ranks still running 5 s after the second Ctrl-C were killed", err
    assert load_checkpoint(out).meta["state"]["epoch"] >= 1  # the last checkpoint is whole
    _resumes(out)


def test_ranks_stop_and_checkpoint_when_the_launcher_is_killed(tmp_path, data_env):
    """SIGKILL leaves the launcher no time to pass anything on: Linux signals each rank (SIGTERM) as its parent
    ends, and the ranks stop together, rank 0 saying where to continue."""
    if not sys.platform.startswith("linux"):
        pytest.skip("a parent-death signal is Linux's")
    out = tmp_path / "run"
    process = _started(out, 500)
    ranks = _children(process.pid)
    try:
        process.kill()
        _, err = process.communicate(timeout=60)  # the ranks hold stderr open until they end
    finally:
        _end_everything(process, ranks)
    _wait_until(lambda: all(_state(pid) in ("gone", "Z") for pid in ranks), "the ranks did not end")
    assert err.count("stopped by SIGTERM") == err.count("; continue with: xpcnn train --resume") == 1, err
    assert "Traceback" not in err, err
    _resumes(out)


def test_ctrl_z_suspends_the_ranks_with_the_launcher_and_fg_resumes_them(tmp_path, data_env):
    out = tmp_path / "run"
    process = _started(out, 500, new_group=True)  # not an orphaned group: a shell's job, which Ctrl-Z can stop
    ranks = _children(process.pid)
    try:
        process.send_signal(signal.SIGTSTP)
        _wait_until(lambda: [_state(pid) for pid in [process.pid, *ranks]] == ["T"] * 3, "not all suspended")
        process.send_signal(signal.SIGCONT)
        _wait_until(lambda: "T" not in [_state(pid) for pid in [process.pid, *ranks]], "not all continued")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        _end_everything(process, ranks)
    assert process.returncode == 130, err
    _resumes(out)


def test_a_closed_progress_pipe_stops_every_rank_with_a_checkpoint(tmp_path, data_env):
    """Rank 0 alone writes progress; when its reader goes away, the ranks agree to stop as on SIGTERM, rank 0
    checkpoints, and the launcher ends as rank 0 does, 141 (SIGPIPE's status)."""
    out = tmp_path / "run"
    process = _started(out, 500, quiet=False)
    ranks = _children(process.pid)
    try:
        process.stderr.close()
        process.wait(timeout=60)
    finally:
        _end_everything(process, ranks)
    assert process.returncode == 141
    assert all(_state(pid) in ("gone", "Z") for pid in ranks)
    _resumes(out)


def test_a_hangup_stops_the_ranks_with_a_checkpoint(tmp_path, data_env):
    """A closed terminal's SIGHUP (an ssh connection that dropped) stops the ranks as SIGTERM does: 128 + 1."""
    out = tmp_path / "run"
    process = _started(out, 500)
    ranks = _children(process.pid)
    try:
        process.send_signal(signal.SIGHUP)
        _, err = process.communicate(timeout=60)
    finally:
        _end_everything(process, ranks)
    assert process.returncode == 128 + signal.SIGHUP, err
    assert err.count("stopped by SIGHUP (its terminal closed) at epoch") == 1 and "Error" not in err, err
    assert all(_state(pid) in ("gone", "Z") for pid in ranks)
    _resumes(out)


FIT = """
import os, sys
import numpy as np
import xpcnn
rng = np.random.default_rng(1)
images, labels = rng.integers(0, 256, (96, 28, 28), dtype=np.uint8), rng.integers(0, 10, 96)
history = xpcnn.fit("seed", (images, labels), backend="{backend}", epochs=2, batch_size=32, seed=3)
weights = history.optimizer.model.state_dict()
rank = os.environ.get("XPCNN_RANK", "0")
np.savez(sys.argv[1].format(rank=rank), loss=[r["train_loss"] for r in history.records], **weights)
"""


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_fit_inside_ranks_trains_the_model_fit_trains_alone(tmp_path, backend):
    script = tmp_path / "fit.py"
    script.write_text(FIT.format(backend=backend))
    alone = run([sys.executable, str(script), str(tmp_path / "alone.npz")])
    assert alone.returncode == 0, alone.stderr
    ranks = run(launched(2, [sys.executable, str(script), str(tmp_path / "rank{rank}.npz")]))
    assert ranks.returncode == 0, ranks.stderr
    expected = dict(np.load(tmp_path / "alone.npz"))
    for rank in range(2):
        got = dict(np.load(tmp_path / f"rank{rank}.npz"))
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)  # float32


def test_the_same_command_runs_under_torchrun(tmp_path, data_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("no torchrun beside this Python")
    common = ["--data-dir", data_dir, "--model", "seed", "--batch-size", 32, "--device", "cpu", "-q"]
    alone = run(xpcnn("train", *common, "--out", tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    rendezvous = ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    ranks = run([str(torchrun), *rendezvous, "-m", "xpcnn", "train", *map(str, common), "--out", str(tmp_path / "two")])
    assert ranks.returncode == 0, ranks.stderr
    assert ranks.stdout.count("best test accuracy") == 1
    expected, got = load_checkpoint(tmp_path / "alone"), load_checkpoint(tmp_path / "two")
    for name, value in expected.model_state.items():
        np.testing.assert_allclose(got.model_state[name], value, rtol=1e-4, atol=1e-6, err_msg=name)  # float32
