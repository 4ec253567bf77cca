"""Learning-rate and temperature schedules: pure functions of the step."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
          kind: str = "cosine") -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine (or constant/linear) decay to
    `min_ratio * peak` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if kind == "linear":
        factor = 1.0 - progress
    elif kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {kind!r} (cosine, linear, constant)")
    return peak * (min_ratio + (1.0 - min_ratio) * factor)


def tau_at(step: int, start: float, end: float, total_steps: int, kind: str = "linear") -> float:
    """Routing temperature: linear (the paper's 1.0 -> 0.1), cosine, exponential or constant."""
    if kind == "constant" or total_steps <= 1:
        return start
    progress = min(1.0, max(0.0, step / (total_steps - 1)))
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "exponential":
        return start * (end / start) ** progress
    raise ValueError(f"unknown tau schedule {kind!r} (linear, cosine, exponential, constant)")
