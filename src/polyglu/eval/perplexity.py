"""Perplexity over token streams with sliding windows, per source.

Windows of `window` tokens (default: the model context) advance by `stride` (default: half a window);
each window scores only the targets the previous one did not, so every target is scored once, with
at least `window - stride` tokens of context (except in the first window). With `document_end` (the
EOS token the data pipeline writes between documents) attention, positions and routing restart
after each document, as in packed training, and the first token of a document, which has no
context, is not scored.

Sources are token shard directories written by `polyglu prepare` (opened with `TokenShards`, which
refuses another tokenizer's data and ids outside the model's vocabulary), or arrays given directly
to `perplexity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from polyglu.data.shards import MANIFEST_NAME, TokenShards
from polyglu.eval.scoring import score_continuations


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) per window over a stream of n_tokens: inputs are tokens[start:end],
    targets tokens[start+1:end+1], of which the last n_scored are scored. Every target (tokens 1..n-1)
    is scored exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window (--window, --stride), got window={window} "
                         f"stride={stride}")
    out: list[tuple[int, int, int]] = []
    scored_until = 0  # targets tokens[1:scored_until+1] are done
    while scored_until < n_tokens - 1:
        end = min((scored_until + stride) if out else window, n_tokens - 1)
        start = max(0, end - window)
        out.append((start, end, end - scored_until))
        scored_until = end
    return out


def _as_arrays(tokens) -> list[np.ndarray]:
    if isinstance(tokens, torch.Tensor):
        return [tokens.cpu().numpy().reshape(-1)]
    if isinstance(tokens, np.ndarray):
        return [tokens.reshape(-1)]
    return [np.asarray(t).reshape(-1) for t in tokens]


def perplexity(model, tokens, *, window: int | None = None, stride: int | None = None,
               batch_size: int = 8, document_end: int | None = None, max_tokens: int | None = None,
               progress: Callable[[int], object] | None = None) -> dict:
    """Perplexity of `model` on a token stream: a 1-D array/tensor, or a list of them (shards, each its
    own stream). Returns {tokens (targets scored), nll (mean, nats), perplexity, bits_per_token,
    windows}. `max_tokens` caps the tokens read (over all shards, in order)."""
    window = min(window or model.config.max_seq_len, model.config.max_seq_len)
    stride = stride or max(window // 2, 1)
    vocab = model.config.vocab_size
    requests: list[tuple[np.ndarray, np.ndarray]] = []
    budget = max_tokens
    for array in _as_arrays(tokens):
        if budget is not None:
            array, budget = array[:budget], budget - min(budget, len(array))
        if len(array) and int(array.max()) >= vocab:
            raise ValueError(f"token id {int(array.max())} is outside the model vocabulary [0, {vocab})")
        for start, end, n in sliding_windows(len(array), window, stride):
            piece = np.asarray(array[start:end + 1], dtype=np.int64)
            requests.append((piece[:-n], piece[-n:]))
    requests_lists = [(c.tolist(), t.tolist()) for c, t in requests]
    scores = score_continuations(model, requests_lists, batch_size=batch_size, document_end=document_end,
                                 progress=progress)
    count = sum(s.count for s in scores)
    nll = -sum(s.logprob for s in scores) / count if count else float("nan")
    return {"tokens": count, "nll": nll, "perplexity": math.exp(nll) if count else float("nan"),
            "bits_per_token": nll / math.log(2) if count else float("nan"), "windows": len(requests),
            "window": window, "stride": stride}


# --------------------------------------------------------------------------------------------
# token shard directories


def shard_sources(specs: Sequence[str]) -> dict[str, Path]:
    """Named sources from `DIR` or `NAME=DIR` entries; a DIR without a manifest whose subdirectories
    have one contributes each subdirectory as a source."""
    sources: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:  # a second source of one name would silently replace the first
        if name in sources:
            raise ValueError(f"--data: two sources are named {name!r} ({sources[name]} and {path}); name them "
                             f"apart with NAME=DIR")
        sources[name] = path

    for spec in specs:
        name, _, location = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(location)
        if not (path / MANIFEST_NAME).is_file() and path.is_dir():
            subdirs = sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file())
            if subdirs and not name:
                for sub in subdirs:
                    add(sub.name, sub)
                continue
        add(name or path.name or str(path), path)
    return sources


def open_sources(sources: dict[str, str | Path], model, tokenizer=None) -> dict[str, TokenShards]:
    """Open every shard directory before scoring any: data of a tokenizer other than `tokenizer` (the
    model's, when known) or with ids outside the model's vocabulary is refused, naming the shard."""
    return {name: TokenShards(path, tokenizer, model_vocab_size=model.config.vocab_size, user="the model")
            for name, path in sources.items()}


def evaluate_perplexity(model, sources: dict[str, str | Path | np.ndarray | Sequence], tokenizer=None,
                        **kwargs) -> dict:
    """{source name: perplexity(...) result} for shard directories or arrays; kwargs go to `perplexity`.
    `tokenizer`: the model's, checked against each shard directory's."""
    opened = open_sources({k: v for k, v in sources.items() if isinstance(v, (str, Path))}, model, tokenizer)
    results = {}
    for name, source in sources.items():
        arrays = opened[name].arrays if name in opened else _as_arrays(source)
        results[name] = perplexity(model, arrays, **kwargs)
    return results
