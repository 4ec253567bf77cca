"""Cross-entropy through the output head without materialising (tokens x vocab) float32 logits.

The head matmul, log-softmax and both gradients are computed chunk by chunk in the forward pass
(the loss is a scalar, so its gradients can be formed then and scaled in backward): peak memory is
one (chunk x vocab) block instead of the full logits and their gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        # hidden: (N, D); weight: (V, D); targets: (N,) with IGNORE_INDEX where no loss
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            logits = (h @ weight.t()).to(acc)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_grad:
                grad = torch.exp(logits - lse[:, None])  # softmax, reusing the logits buffer
                grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad *= valid[:, None]
                grad = grad.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk_size] = grad @ weight
                if grad_weight is not None:
                    grad_weight += (grad.t() @ h).to(acc)
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
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                            targets.reshape(-1), chunk_size)
