"""Learning-rate and temperature schedules: pure functions of the step."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
          kind: str = "cosine") -> float:
    """The learning rate of step `step` (0 .. total_steps-1): linear warm-up whose last step
    (warmup_steps-1) is the only one at `peak`, then cosine (or linear) decay reaching
    `min_ratio * peak` exactly at the last step, total_steps-1; "constant" stays at `peak`.
    A warm-up longer than the run never reaches the peak (nothing is left to decay)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    if kind not in ("cosine", "linear"):
        raise ValueError(f"unknown lr schedule {kind!r} (cosine, linear, constant)")
    # decay starts at the step that reached the peak, so the peak is not held for a second step
    decay_start = max(warmup_steps - 1, 0)
    decay_steps = total_steps - 1 - decay_start
    progress = 1.0 if decay_steps <= 0 else min(1.0, max(0.0, (step - decay_start) / decay_steps))
    factor = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
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
