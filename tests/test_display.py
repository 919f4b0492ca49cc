import errno
import io
import os
import re
import signal

import pytest

from xpcnn.base.stopping import stop_on_signals
from xpcnn.training.display import Progress, fit_to_width, terminal_width

RECORD = {
    "train_loss": 0.1234,
    "train_accuracy": 0.9612,
    "val_loss": 0.0456,
    "val_accuracy": 0.9871,
    "test_loss": 0.0345,
    "test_accuracy": 0.9889,
    "seconds": 41.5,
    "images_per_second": 1446.0,
}


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def show_an_epoch(progress, steps=300, log_every=50, start_step=0):
    progress.start_epoch(1, 3, steps, start_step)
    for step in range(start_step + log_every, steps + 1, log_every):
        progress.update(step, 0.25, 0.9375, 12345.0)
    progress.end_epoch(RECORD)


def screen_lines(text):
    """What a terminal shows as separate lines: carriage returns and newlines both start one."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_live_bar_never_exceeds_the_terminal_width(columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    terminal = FakeTerminal()
    show_an_epoch(Progress(terminal))
    lines = screen_lines(terminal.getvalue())
    assert lines and max(len(line) for line in lines) <= columns
    assert any(line.startswith("epoch 1/3 300/300 loss 0.2500") for line in lines)


def test_live_bar_shows_loss_accuracy_speed_elapsed_and_eta(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    terminal = FakeTerminal()
    progress = Progress(terminal)
    progress.start_epoch(2, 3, 300)
    progress.update(50, 0.25, 0.9375, 12345.0)
    bar = screen_lines(terminal.getvalue())[-1]
    assert re.fullmatch(r"epoch 2/3 50/300 loss 0\.2500 acc 93\.75% 12,345 img/s \d\d:\d\d<\d\d:\d\d \|.+\|", bar), bar


def test_live_epoch_summary_stays_after_the_bar_is_cleared(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    terminal = FakeTerminal()
    show_an_epoch(Progress(terminal))
    summary = terminal.getvalue().rsplit("\r", 1)[-1]
    assert summary.endswith("\n") and summary.count("\n") == 1
    assert "train loss 0.1234 acc 96.12%" in summary and "test loss 0.0345 acc 98.89%" in summary


def test_plain_log_lines_when_not_a_terminal():
    log = io.StringIO()
    show_an_epoch(Progress(log))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 300 // 50 + 1
    assert re.fullmatch(
        r"epoch 1/3 step 50/300 loss 0\.2500 acc 93\.75% 12,345 img/s elapsed \d\d:\d\d eta \d\d:\d\d", lines[0]
    )
    assert lines[-1] == (
        "epoch 1/3  train loss 0.1234 acc 96.12%  val loss 0.0456 acc 98.71%  test loss 0.0345 acc 98.89%  "
        "41.5 s, 1,446 img/s"
    )


def test_resumed_epoch_counts_from_where_it_starts():
    log = io.StringIO()
    show_an_epoch(Progress(log), start_step=100)
    assert log.getvalue().splitlines()[0].startswith("epoch 1/3 step 150/300 ")


@pytest.mark.parametrize("stream", [FakeTerminal(), io.StringIO()])
def test_quiet_prints_nothing(stream):
    show_an_epoch(Progress(stream, quiet=True))
    assert stream.getvalue() == ""


def test_fit_to_width_packs_parts_without_splitting_them():
    assert fit_to_width(["epoch 1/3", "train loss 0.1", "12 s"], 80) == ["epoch 1/3  train loss 0.1  12 s"]
    assert fit_to_width(["epoch 1/3", "train loss 0.1", "12 s"], 20) == ["epoch 1/3", "  train loss 0.1", "  12 s"]


def test_a_terminal_reporting_zero_columns_falls_back_to_columns_then_80(monkeypatch):
    monkeypatch.setattr("os.get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    terminal = FakeTerminal()
    terminal.fileno = lambda: 2
    monkeypatch.setenv("COLUMNS", "55")
    assert terminal_width(terminal) == 55
    monkeypatch.delenv("COLUMNS")
    assert terminal_width(terminal) == 80


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_the_bar_shows_on_a_pseudo_terminal_that_reports_zero_rows(monkeypatch):
    import fcntl
    import struct
    import termios

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 80, 0, 0))  # 0 rows, 80 columns
    shown = b""
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr("sys.stderr", terminal)  # tqdm asks the screen's shape of stderr and stdout only
        show_an_epoch(Progress(terminal), steps=4, log_every=1)
        terminal.flush()
        while chunk := _read_available(leader):
            shown += chunk
    os.close(leader)
    assert "epoch 1/3 4/4 loss 0.2500" in shown.decode(errors="replace")


def _read_available(fd):
    import select

    return os.read(fd, 65536) if select.select([fd], [], [], 0.2)[0] else b""


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


class HungUpTerminal(FakeTerminal):
    def write(self, text):
        raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize(
    "stream",
    [ClosedPipe(), type("ClosedTerminal", (ClosedPipe, FakeTerminal), {})(), HungUpTerminal()],
    ids=["pipe", "pipe-as-terminal", "hung-up-terminal"],
)
def test_a_reader_that_goes_away_ends_the_progress_and_asks_the_run_to_stop(stream):
    progress = Progress(stream)
    with stop_on_signals() as stop:
        show_an_epoch(progress)
        assert stop.signum == signal.SIGPIPE
    assert progress.stream is None
    show_an_epoch(progress)  # writes nothing more, raises nothing


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_a_log_that_cannot_grow_ends_the_progress_not_the_run(code):
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(code, os.strerror(code))

    progress = Progress(FullDisk())
    with stop_on_signals() as stop:
        show_an_epoch(progress)
        assert stop.signum is None  # the run goes on
    assert progress.stream is None
    show_an_epoch(progress)


def test_another_error_of_the_stream_is_not_taken_for_a_reader_that_went_away():
    class Unwritable(io.StringIO):
        def write(self, text):
            raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError, match="Bad file descriptor"):
        show_an_epoch(Progress(Unwritable()))
