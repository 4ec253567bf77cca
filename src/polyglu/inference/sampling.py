"""Sampling: pure functions of the next-token logits (B, V); nothing here reads a model or a cache.

    ids = sample_next(logits, temperature=0.7, top_k=50, top_p=0.9, generator=g, vocab_limit=260)

Everything runs on the logits' device: the engine keeps sampled ids there and reads them on the host
only every few steps (`polyglu.inference.engine`).
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p. logits: (B, V).

    top_k keeps exactly k tokens (ties with the k-th are broken by index); 0 or None: no limit.
    top_p keeps the smallest set of most likely tokens whose mass reaches top_p, and always the
    most likely one (top_p near 0 is greedy).
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        top = torch.topk(logits, top_k, dim=-1).indices  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def mask_padding(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """Logits with every id >= vocab_limit at -inf: the padding rows of a vocabulary padded past the
    tokenizer's (e.g. 260 -> 320 for speed) are never chosen. None, or the full width: unchanged."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    if vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1 (the tokenizer's vocabulary size), got {vocab_limit}")
    return torch.cat([logits[..., :vocab_limit], logits.new_full((*logits.shape[:-1], logits.shape[-1] - vocab_limit),
                                                                 float("-inf"))], dim=-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ValueError naming the first sampling argument outside its range."""
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no nucleus filter), got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                vocab_limit: int | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature is 0, else a draw from
    softmax(filtered logits / temperature); ids >= `vocab_limit` (vocabulary padding) never.
    Returns (B,) long on the logits' device."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        if temperature <= 0:  # argmax over the real ids only: no copy of the logits
            return logits[..., :vocab_limit].argmax(dim=-1)
        logits = mask_padding(logits, vocab_limit)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
