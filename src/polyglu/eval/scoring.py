"""Log-likelihood of token continuations, batched and length-sorted: the one scoring routine behind the
harness adapter (`loglikelihood`, `loglikelihood_rolling`) and perplexity."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polyglu.documents import doc_ids_from_eos, doc_ids_with_padding


@dataclass
class Score:
    logprob: float  # sum of log p(target) over the scored targets (natural log)
    count: int  # targets scored
    greedy: bool  # every scored target is the argmax of its distribution


@torch.no_grad()
def score_continuations(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 16, document_end: int | None = None,
                        progress: Callable[[int], object] | None = None) -> list[Score]:
    """Score each (context ids, continuation ids): log p(continuation | context) under the model.

    Contexts need at least one token. A sequence longer than the model context loses its first
    tokens (the continuation itself must fit). Requests run longest first, `batch_size` at a time,
    right-padded (padding is never attended to by earlier tokens). With `document_end`, the input is
    split into documents after each such token, as in packed training: attention, positions and
    routing restart, and a target that starts a new document is not scored (`Score.count` says how
    many were). `progress(n)` is called with the number of requests finished by each batch.
    """
    sequences = _sequences(requests, model.config.max_seq_len)
    was_training = model.training
    model.eval()
    results: list[Score | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, score in zip(batch, _score_batch(model, [sequences[i] for i in batch], document_end)):
                results[i] = score
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _sequences(requests, max_len: int) -> list[tuple[list[int], int]]:
    """(input ids, number of targets at the end) per request, cut to the model context."""
    sequences = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context:
            raise ValueError(f"request {i}: empty context (condition on at least one token, e.g. EOS)")
        if len(continuation) > max_len:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds the model "
                             f"context max_seq_len={max_len}")
        sequences.append(((context + continuation)[-(max_len + 1):], len(continuation)))
    return sequences


def _batch_inputs(model, sequences: list[tuple[list[int], int]], document_end: int | None):
    """Right-padded inputs of a batch: (ids (b, T), real (b, T) bool, doc_ids or None, lengths)."""
    lengths = [len(full) - 1 for full, _ in sequences]  # inputs: all but the last token
    T = max(lengths)
    ids = torch.zeros(len(sequences), T, dtype=torch.long)
    real = torch.zeros(len(sequences), T, dtype=torch.bool)
    for row, (full, _) in enumerate(sequences):
        ids[row, :lengths[row]] = torch.tensor(full[:-1])
        real[row, :lengths[row]] = True
    doc_ids = None
    if document_end is not None and bool((ids[real] == document_end).any()):
        doc_ids = doc_ids_from_eos(ids, document_end)
    # a non-causal pool (e.g. `sequence`) would average right padding into the tokens' routing
    if not model.config.causal_routing and not bool(real.all()):
        doc_ids = torch.zeros_like(ids) if doc_ids is None else doc_ids
    if doc_ids is not None:
        doc_ids = doc_ids_with_padding(real, doc_ids).to(model.device)  # right padding: a document of its own
    return ids, doc_ids, lengths


def _score_batch(model, sequences: list[tuple[list[int], int]], document_end: int | None) -> list[Score]:
    ids, doc_ids, lengths = _batch_inputs(model, sequences, document_end)
    hidden = model(ids.to(model.device), doc_ids, compute_logits=False).hidden_states  # (b, T, d)
    # only the scored positions go through the head: (N, d) -> (N, vocab)
    rows, positions, targets = [], [], []
    for row, (full, n) in enumerate(sequences):
        rows += [row] * n
        positions += range(lengths[row] - n, lengths[row])
        targets += full[len(full) - n:]
    if not targets:
        return [Score(0.0, 0, True) for _ in sequences]
    logits = model.lm_head(hidden[rows, positions]).float()
    target = torch.tensor(targets, device=model.device)
    token_logprob = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1).cpu()
    is_greedy = (logits.argmax(-1) == target).cpu()
    scored = torch.ones(len(targets), dtype=torch.bool)
    if document_end is not None:
        scored = ids[rows, positions] != document_end  # the target after an end token opens a new document
    scores, offset = [], 0
    for _, n in sequences:
        keep = scored[offset:offset + n]
        lp = token_logprob[offset:offset + n][keep]
        scores.append(Score(float(lp.double().sum()), int(keep.sum()), bool(is_greedy[offset:offset + n][keep].all()))
                      if n else Score(0.0, 0, True))
        offset += n
    return scores
