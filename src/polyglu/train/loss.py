"""Cross-entropy through the output head without materialising (tokens x vocab) float32 logits.

Two kernels, one result (`cross_entropy_sum` chooses):
- "chunked": the head matmul, log-softmax and both gradients computed chunk by chunk in the forward
  pass with torch ops (the loss is a scalar, so its gradients can be formed then and scaled in
  backward): peak memory is one (chunk x vocab) block instead of the full logits and their gradient.
  When no gradient can be asked for (evaluation under torch.no_grad, or no input requires grad)
  only the loss is computed. Any device.
- "fused": liger-kernel's fused linear cross-entropy (Triton; the `[gpu]` extra), logits in the
  autocast dtype (bf16 under bf16 autocast) with float32 softmax statistics and weight-gradient
  accumulation. The default on CUDA for training when liger-kernel is installed. With
  `vocab_multiple` the head is padded to a multiple of it (128: aligned GEMM tiles for the 151,669
  -token vocabulary), the pad logits masked to -inf; the model's weights keep their shape.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

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


LOSS_KERNELS = ("auto", "chunked", "fused")


@functools.cache
def fused_available() -> bool:
    """liger-kernel importable (it brings triton)."""
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def loss_kernel(hidden: torch.Tensor, weight: torch.Tensor, choice: str = "auto") -> str:
    """"fused" or "chunked": `choice` unless "auto", which takes "fused" for training on CUDA (a
    gradient wanted, liger-kernel installed) and "chunked" otherwise (CPU, evaluation)."""
    if choice not in LOSS_KERNELS:
        raise ValueError(f"loss kernel must be one of {', '.join(LOSS_KERNELS)}, got {choice!r}")
    if choice != "auto":
        return choice
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return "fused" if hidden.is_cuda and wants_grad and fused_available() else "chunked"


def padded_head(weight: torch.Tensor, multiple: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight with its rows padded by zeros to a multiple of `multiple`, a bias of 0 on real rows and
    -inf on pad rows) or (weight, None) when it needs no padding. The pad is differentiable (its
    gradient flows to the real rows only)."""
    vocab = weight.shape[0]
    pad = (-vocab) % multiple if multiple else 0
    if not pad:
        return weight, None
    bias = torch.zeros(vocab + pad, device=weight.device, dtype=weight.dtype)
    bias[vocab:] = float("-inf")
    return F.pad(weight, (0, 0, 0, pad)), bias


def fused_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            vocab_multiple: int | None = None) -> torch.Tensor:
    """`chunked_cross_entropy_sum` through liger-kernel's fused linear cross-entropy (Triton: CUDA, or CPU
    tensors under TRITON_INTERPRET=1). Logits in the autocast dtype when autocast is on, else in
    hidden's dtype; float32 loss."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    weight, bias = padded_head(weight.to(dtype), vocab_multiple)
    with torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
            else contextlib.nullcontext():
        loss = LigerFusedLinearCrossEntropyFunction.apply(
            hidden, weight, targets.reshape(-1), bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", None, False,
            torch.float32)[0]
    return loss.float()


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048,
                      kernel: str = "auto", vocab_multiple: int | None = None) -> torch.Tensor:
    """Sum over non-ignored tokens of -log softmax(hidden @ weight.T)[target], by `loss_kernel`'s choice
    ("fused" takes `vocab_multiple`; "chunked" needs no padding and ignores it)."""
    if loss_kernel(hidden, weight, kernel) == "fused":
        return fused_cross_entropy_sum(hidden, weight, targets, vocab_multiple)
    return chunked_cross_entropy_sum(hidden, weight, targets, chunk_size)
