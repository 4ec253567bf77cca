"""Cross-entropy through the output head without materialising (tokens x vocab) float32 logits.

The head matmul, log-softmax and both gradients are computed chunk by chunk in the forward pass
(the loss is a scalar, so its gradients can be formed then and scaled in backward): peak memory is
one (chunk x vocab) block instead of the full logits and their gradient. When no gradient can be
asked for (evaluation under torch.no_grad, or no input requires grad) only the loss is computed.
"""

from __future__ import annotations

import torch

from polyglu.data.special_tokens import IGNORE_INDEX


def _chunked_loss_and_grads(hidden, weight, targets, chunk_size: int, grad_hidden_wanted: bool,
                            grad_weight_wanted: bool):
    """(loss sum, d loss/d hidden or None, d loss/d weight or None) in one pass over the chunks.
    hidden: (N, D); weight: (V, D); targets: (N,) with IGNORE_INDEX where no loss."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_wanted else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_weight_wanted else None
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size]
        t = targets[start:start + chunk_size]
        valid = t != IGNORE_INDEX
        safe_t = torch.where(valid, t, torch.zeros_like(t))
        logits = (h @ weight.t()).to(acc)  # (n, V)
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, safe_t[:, None]).squeeze(1)
        total += ((lse - picked) * valid).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        grad = torch.exp(logits - lse[:, None])  # softmax, reusing the logits buffer
        grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
        grad *= valid[:, None]
        grad = grad.to(hidden.dtype)
        if grad_hidden is not None:
            grad_hidden[start:start + chunk_size] = grad @ weight
        if grad_weight is not None:
            grad_weight += (grad.t() @ h).to(acc)
    return total, grad_hidden, grad_weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        total, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden, weight, targets, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) * grad_out if ctx.has[0] else None
        gw = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_size: int = 2048) -> torch.Tensor:
    """Sum over non-ignored tokens of -log softmax(hidden @ weight.T)[target].

    hidden (..., D), targets (...); returns a float32 scalar. Divide by the token count yourself
    (so gradient accumulation and data-parallel ranks can share one normaliser).
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # the Function would still form the gradients its inputs "need" (a Parameter always does),
        # which costs two more matmuls per chunk than the loss alone
        return _chunked_loss_and_grads(hidden, weight, targets, chunk_size, False, False)[0]
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
