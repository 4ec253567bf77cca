"""Parameter accounting by component (tied weights counted once)."""

from __future__ import annotations

from torch import nn

ROUTING_NAMES = (".alpha", ".beta", ".gate_net.", ".routing_map")


def parameter_counts(model: nn.Module) -> dict[str, int | float]:
    """total, embedding, attention, ffn, routing, norm counts and routing_share (fraction of total)."""
    counts = {"total": 0, "embedding": 0, "attention": 0, "ffn": 0, "routing": 0, "norm": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        counts["total"] += n
        if name.startswith(("embed_tokens", "lm_head")):
            counts["embedding"] += n
        elif any(key in name for key in ROUTING_NAMES):
            counts["routing"] += n
        elif ".attn." in name:
            counts["attention"] += n
        elif ".ffn." in name:
            counts["ffn"] += n
        else:
            counts["norm"] += n
    counts["routing_share"] = counts["routing"] / counts["total"] if counts["total"] else 0.0
    return counts
