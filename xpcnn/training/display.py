"""Training progress for people: a tqdm bar per epoch on a terminal, plain log lines elsewhere.

The :class:`~xpcnn.training.train.Trainer` calls ``start_epoch``, then ``update`` at each log
interval (the only host reads inside an epoch), then ``end_epoch`` with the epoch's record.

* On a terminal: one bar per epoch, redrawn in place and never wider than the terminal
  (loss, accuracy, images/s, elapsed and ETA first; the bar takes what width is left), then
  the epoch's summary, wrapped to the terminal's width.
* Elsewhere (a pipe, a log file): one line per update and one summary line per epoch.
* ``quiet`` (or no stream): nothing; errors and the command's final summary are not progress.

A reader that goes away (``xpcnn train 2>&1 | head``, a ``tee`` killed by the same Ctrl-C, a terminal that hung
up) ends the progress, not the run: the run stops at its next step boundary with a checkpoint, as SIGPIPE would stop
it (:func:`xpcnn.base.stopping.request_stop`; after a hang-up, SIGHUP has asked first).  A log file that cannot
grow (a full disk, a size limit, a quota) ends the progress and lets the run go on.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

from ..base.files import point_at_devnull
from ..base.stopping import BROKEN_PIPE, request_stop

READER_GONE = (errno.EPIPE, errno.EIO)  # a closed pipe; a terminal that hung up (an ssh connection that dropped)
LOG_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # the log file's disk, size limit or quota: it ends, not the run
# The figures come first so that a narrow terminal trims the bar, not them.
BAR_FORMAT = "{desc} {elapsed}<{remaining} |{bar}|"
DEFAULT_WIDTH = 80


def terminal_width(stream: TextIO) -> int:
    """Columns of the terminal ``stream`` writes to; else ``$COLUMNS``; else 80.

    A terminal that reports 0 columns (a pseudo-terminal nobody sized) counts as none.
    """
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        columns = 0
    if columns > 0:
        return columns
    try:
        return max(int(os.environ["COLUMNS"]), 1)
    except (KeyError, ValueError):
        return DEFAULT_WIDTH


def fit_to_width(parts: list[str], width: int) -> list[str]:
    """Join ``parts`` with two spaces into lines of at most ``width`` columns (a part is never split;
    continuation lines are indented by two spaces)."""
    lines, line = [], ""
    for part in parts:
        candidate = f"{line}  {part}" if line else part
        if line and len(candidate) > width:
            lines.append(line)
            candidate = f"  {part}"
        line = candidate
    return lines + [line]


def _until_the_reader_goes(method):
    """``method`` of a Progress, after which a closed pipe or terminal, or a full log, ends the progress (the module's
    docstring)."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except OSError as error:
            if error.errno not in READER_GONE + LOG_FULL:
                raise
            self._write_no_more()
            if error.errno in READER_GONE:  # as SIGPIPE would, where a full log leaves the run going on
                request_stop(BROKEN_PIPE)

    return guarded


class Progress:
    """Per-epoch progress on ``stream``: a live bar where it is a terminal, log lines elsewhere."""

    def __init__(self, stream: TextIO | None = sys.stderr, quiet: bool = False):
        self.stream = None if quiet else stream
        self.live = bool(self.stream is not None and self.stream.isatty())
        self.epoch, self._steps = 0, 1
        self._prefix = ""
        self._bar: tqdm | None = None
        self._start_step, self._started = 0, 0.0

    @_until_the_reader_goes
    def start_epoch(self, epoch: int, epochs: int, steps: int, start_step: int = 0) -> None:
        """Epoch ``epoch`` of ``epochs`` (1-based) begins, or resumes after ``start_step`` of its ``steps``."""
        self.epoch, self._steps, self._start_step = epoch, steps, start_step
        self._prefix = f"epoch {epoch}/{epochs}"
        self._started = time.perf_counter()
        if self.live:
            self._close_bar()
            self._bar = tqdm(
                total=steps,
                initial=start_step,
                desc=f"{self._prefix} {start_step}/{steps}",
                file=self.stream,
                bar_format=BAR_FORMAT,
                ncols=terminal_width(self.stream),
                nrows=2,  # one bar at the top; a pseudo-terminal reporting 0 rows would make tqdm hide it
                mininterval=0,
                leave=False,
            )

    @_until_the_reader_goes
    def update(self, step: int, loss: float, accuracy: float, images_per_second: float) -> None:
        """``step`` steps of ``steps`` done; running mean loss and accuracy (0-1) and images/s of the epoch."""
        if self.stream is None:
            return
        figures = f"loss {loss:.4f} acc {accuracy:.2%} {images_per_second:,.0f} img/s"
        if self._bar is not None:
            self._bar.ncols = terminal_width(self.stream)  # follows a resized terminal
            self._bar.set_description_str(f"{self._prefix} {step}/{self._steps} {figures}", refresh=False)
            self._bar.update(step - self._bar.n)
            return
        elapsed = time.perf_counter() - self._started
        remaining = elapsed / max(step - self._start_step, 1) * (self._steps - step)
        self.stream.write(
            f"{self._prefix} step {step}/{self._steps} {figures} "
            f"elapsed {tqdm.format_interval(elapsed)} eta {tqdm.format_interval(remaining)}\n"
        )
        self.stream.flush()

    @_until_the_reader_goes
    def end_epoch(self, record: dict) -> None:
        """Print the finished epoch's summary (``record``: a ``RunState.history`` entry)."""
        if self.stream is None:
            return
        self._close_bar()
        parts = [self._prefix, f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2%}"]
        for split in ("val", "test"):
            if f"{split}_loss" in record:
                parts.append(f"{split} loss {record[f'{split}_loss']:.4f} acc {record[f'{split}_accuracy']:.2%}")
        parts.append(f"{record['seconds']:.1f} s, {record['images_per_second']:,.0f} img/s")
        if "compile_seconds" in record:
            parts.append(f"(+ {record['compile_seconds']:.1f} s compiling)")
        lines = fit_to_width(parts, terminal_width(self.stream)) if self.live else ["  ".join(parts)]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def _write_no_more(self) -> None:
        """Point the stream's file at /dev/null (where later messages and Python's flush at exit go without failing
        again) and write no more progress: its reader went away, or its disk is full (the run's own files may lie
        on another disk; where they do not, their write fails and says so)."""
        point_at_devnull(self.stream)
        self.stream, self._bar = None, None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
