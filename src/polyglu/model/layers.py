"""Small building blocks: RMSNorm, rotary position tables, and whether a module's call can be skipped
(`plain_linear`, `global_module_hooks`: a fused path that computes a Linear's product itself)."""

from __future__ import annotations

import torch
from torch import nn

from polyglu.documents import document_positions  # noqa: F401  (re-exported: its old home)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float = 10_000.0,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim/2) in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, hd/2)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate split halves: (x1*cos - x2*sin, x1*sin + x2*cos).

    x: (B, H, T, hd); cos/sin: (B, 1, T, hd/2) or (T, hd/2), already gathered at the positions.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is F.linear(x, weight, bias): no subclass or wrapper (an adapter,
    a parametrization) and no hooks that calling it would run."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks
                                              or module._backward_hooks or module._backward_pre_hooks)


def global_module_hooks() -> bool:
    """Whether hooks registered for every module (`torch.nn.modules.module.register_module_forward_hook`
    and the like) are there: a product that stands in for two modules' calls would skip them."""
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
