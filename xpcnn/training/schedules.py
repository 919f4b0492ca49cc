"""Learning-rate schedules: the rate of each optimiser step of a run, which the trainer sets before the step."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "step", "cosine", "onecycle")


def scheduled_lr(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``.

    constant: ``base_lr`` throughout.
    step:     ``base_lr``, times 0.1 after 50% and again after 75% of the steps.
    cosine:   cosine decay from ``base_lr`` to 0.
    onecycle: cosine warm-up from ``base_lr / 25`` to ``base_lr`` over the first
              30% of the steps, then cosine decay towards ``base_lr / 25e4``
              (PyTorch's OneCycleLR's shape and defaults).  The position is
              ``step / total_steps``, so the peak comes one step later than
              OneCycleLR's and the last step's rate lies one step short of the
              floor (for 80 steps: 4e-5 of a peak of 0.05, where OneCycleLR
              reaches 2e-7); kept so, as every recipe was chosen with it.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    progress = step / max(total_steps, 1)
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if schedule == "cosine":
        return base_lr * _cosine_ramp(1.0, 0.0, progress)
    warmup = 0.3
    initial, final = base_lr / 25, base_lr / 25e4
    if progress < warmup:
        return _cosine_ramp(initial, base_lr, progress / warmup)
    return _cosine_ramp(base_lr, final, (progress - warmup) / (1 - warmup))


def _cosine_ramp(start: float, end: float, fraction: float) -> float:
    """Half a cosine from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0)))
