"""Loading a model (and its tokenizer) from a model directory: the library's entry point for every
verb and adapter that reads a trained model.

    model = load_model("runs/demo/final", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polyglu.model.transformer import PolychromaticLM


def load_model(directory: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, **overrides: Any) -> PolychromaticLM:
    """Load a PolychromaticLM from a model directory. `overrides` change config fields that do not
    affect tensor shapes (e.g. eval_routing, mixed_impl, routing_pool)."""
    return PolychromaticLM.from_pretrained(directory, device=device, dtype=dtype, **overrides)
