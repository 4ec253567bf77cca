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
    max_len = model.config.max_seq_len
    sequences: list[tuple[list[int], int]] = []  # (input ids, number of targets at the end)
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context:
            raise ValueError(f"request {i}: empty context (condition on at least one token, e.g. EOS)")
        if len(continuation) > max_len:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds the model "
                             f"context max_seq_len={max_len}")
        full = (context + continuation)[-(max_len + 1):]
        sequences.append((full, len(continuation)))

    was_training = model.training
    model.eval()
    device = model.device
    # a non-causal pool (e.g. `sequence`) would average right padding into the tokens' routing
    non_causal = not model.config.causal_routing
    results: list[Score | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            lengths = [len(sequences[i][0]) - 1 for i in batch]  # inputs: all but the last token
            T = max(lengths)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            real = torch.zeros(len(batch), T, dtype=torch.bool)
            for row, i in enumerate(batch):
                ids[row, :lengths[row]] = torch.tensor(sequences[i][0][:-1])
                real[row, :lengths[row]] = True
            doc_ids = None
            if document_end is not None and bool((ids[real] == document_end).any()):
                doc_ids = doc_ids_from_eos(ids, document_end)
            if non_causal and not bool(real.all()):
                doc_ids = torch.zeros_like(ids) if doc_ids is None else doc_ids
            if doc_ids is not None:
                doc_ids = doc_ids_with_padding(real, doc_ids).to(device)  # right padding: a document of its own
            hidden = model(ids.to(device), doc_ids, compute_logits=False).hidden_states  # (b, T, d)

            # only the scored positions go through the head: (N, d) -> (N, vocab)
            rows, positions, targets = [], [], []
            for row, i in enumerate(batch):
                full, n = sequences[i]
                L = lengths[row]
                rows += [row] * n
                positions += range(L - n, L)
                targets += full[len(full) - n:]
            scored = torch.zeros(len(targets), dtype=torch.bool)
            if targets:
                logits = model.lm_head(hidden[rows, positions]).float()
                logprobs = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(targets, device=device)
                token_logprob = logprobs.gather(-1, target[:, None]).squeeze(-1).cpu()
                is_greedy = (logits.argmax(-1) == target).cpu()
                scored = torch.ones(len(targets), dtype=torch.bool)
                if document_end is not None:
                    inputs = ids[rows, positions]
                    scored = inputs != document_end  # the target after an end token opens a new document
            offset = 0
            for i in batch:
                n = sequences[i][1]
                keep = scored[offset:offset + n]
                if n:
                    lp = token_logprob[offset:offset + n][keep]
                    results[i] = Score(float(lp.double().sum()), int(keep.sum()),
                                       bool(is_greedy[offset:offset + n][keep].all()))
                else:
                    results[i] = Score(0.0, 0, True)
                offset += n
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
