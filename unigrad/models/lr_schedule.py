"""Learning-rate multipliers: linear warmup, then constant, linear or cosine decay to a floor (the learner's and the
tiny model's pretraining; kept below both)."""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, warmup: int = 0, total: int = 0, schedule: str = "constant",
                  min_ratio: float = 0.0) -> float:
    """The factor on the base learning rate for optimizer step `step` (from 0).

    Steps 0 .. warmup-1 ramp up linearly to 1 ((step + 1) / warmup). After the warmup, `constant` stays at 1;
    `linear` and `cosine` decay from 1 at the end of the warmup to `min_ratio` at step `total` and stay there.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant, linear, cosine)")
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return min_ratio + (1.0 - min_ratio) * decay
