"""Grouped-query attention with QK-norm and rotary embeddings, through PyTorch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyglu.model.flex import DocumentMask, flex_attention
from polyglu.model.layers import RMSNorm, apply_rotary
from polyglu.model_config import ModelConfig

# enable_gqa arrived in torch 2.5; older versions repeat the K/V heads explicitly
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        # QK-norm: RMSNorm over head_dim, before rotary
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache=None, layer: int = 0) -> torch.Tensor:
        """x: (B, T, d_model); cos/sin: (B, 1, T, hd/2); mask: bool (B, 1, T, S), a flex
        DocumentMask, or None for causal."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, hd), (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd)
        if isinstance(mask, DocumentMask):  # attention_backend="flex" on packed documents (model/flex.py)
            y = flex_attention(q, k, v, mask)  # (B, H, T, hd)
        else:
            is_causal = mask is None and T > 1 and k.shape[2] == T
            if mask is None and T > 1 and not is_causal:
                raise ValueError("a multi-token chunk after cached tokens needs an explicit mask")
            y = _sdpa(q, k, v, mask, is_causal, self.n_heads // self.n_kv_heads)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def _sdpa(q, k, v, mask, is_causal: bool, n_rep: int, device_type: str | None = None) -> torch.Tensor:
    """SDPA with n_rep query heads per K/V head. On CUDA a mask together with `enable_gqa` is taken
    only by the math backend (fp32 scores materialised, ~8.6 GB per layer at B=8, T=4096), so with a
    mask the K/V heads are repeated and the memory-efficient kernel runs instead; `device_type`
    overrides q's device (tests)."""
    if n_rep > 1:
        expand = mask is not None and (device_type or q.device.type) == "cuda"
        if _SDPA_HAS_GQA and not expand:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
