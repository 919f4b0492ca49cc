"""Training progress for people: live on a terminal, one line per epoch elsewhere."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """Live progress on a terminal (rewritten in place), one line per epoch elsewhere."""

    def __init__(self, stream: TextIO | None = sys.stderr):
        self.stream = stream
        self.live = bool(stream is not None and stream.isatty())
        self.epoch, self._steps = 0, 1
        self._prefix = ""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self._steps = epoch, steps
        self._prefix = f"epoch {epoch}/{epochs}"

    def update(self, step: int, loss: float, accuracy: float, images_per_second: float) -> None:
        if not self.live:
            return
        width = 24
        filled = int(width * step / self._steps)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"\r{self._prefix} [{bar}] {step}/{self._steps}  loss {loss:.4f}  acc {accuracy:6.2%}  "
            f"{images_per_second:,.0f} img/s"
        )
        self.stream.flush()

    def end_epoch(self, record: dict) -> None:
        if self.stream is None:
            return
        parts = [self._prefix, f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2%}"]
        for split in ("val", "test"):
            if f"{split}_loss" in record:
                parts.append(f"{split} loss {record[f'{split}_loss']:.4f} acc {record[f'{split}_accuracy']:.2%}")
        parts.append(f"{record['seconds']:.1f} s, {record['images_per_second']:,.0f} img/s")
        self.stream.write(("\r\x1b[K" if self.live else "") + "  ".join(parts) + "\n")
        self.stream.flush()
