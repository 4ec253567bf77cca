"""FlexAttention for packed documents: a document-causal `BlockMask` instead of a dense (T x T) mask.

With `ModelConfig.attention_backend = "flex"` (or "auto", the default, for packed training on CUDA:
`uses_flex`), a forward with `doc_ids` builds one `BlockMask` per batch (shared by every layer) and each layer calls `torch.nn.attention.flex_attention` with it. The
block mask stores, per 128 x 128 tile, whether the tile is empty, full or partial, so memory is
O(T^2 / 128^2) and fully masked tiles (other documents) are skipped: the job flash-attn's varlen
kernel did in the original project. Without `doc_ids` the model keeps SDPA with `is_causal` (the
flash kernel on GPU), which is already the fastest causal attention.

A document is a maximal run of equal ids along a row (`polyglu.documents`): ids [3, 3, 5, 5, 3]
hold three documents.

Decoding one token (T = 1) stays on SDPA with the cache's (B, 1, 1, S) mask: a one-row query has no
(T x T) mask to avoid, and a BlockMask would have to be rebuilt every step (its key length grows),
costing more than the attention it serves.

FlexAttention has no backward on CPU: a CPU forward that needs gradients (training) takes SDPA
with the equivalent dense mask (`DocumentMask.dense`), so a flex model trains anywhere.

On CPU flex_attention runs eagerly (PyTorch's unfused reference implementation: correct, it
materialises the scores like SDPA would, fine for tests); on CUDA it goes through `torch.compile`,
which generates the fused Triton kernel (compiled once per shape). The PyTorch >= 2.5 check is
ModelConfig's (a clear ConfigError when the backend is chosen).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polyglu.documents import segment_ids


@dataclass
class DocumentMask:
    """The attention mask a flex forward hands to every layer: the BlockMask and what it was built from."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    segments: torch.Tensor | None  # (B, kv_len) run numbers, None for plain causal
    q_len: int
    kv_len: int

    def dense(self) -> torch.Tensor:
        """The same mask as booleans (B or 1, 1, q_len, kv_len), for the SDPA fallback."""
        device = self.block_mask.kv_num_blocks.device
        q_slot = torch.arange(self.kv_len - self.q_len, self.kv_len, device=device)
        mask = (torch.arange(self.kv_len, device=device)[None, :] <= q_slot[:, None])[None]  # (1, T, S)
        if self.segments is not None:
            mask = mask & (self.segments[:, q_slot, None] == self.segments[:, None, :])  # (B, T, S)
        return mask[:, None]


def document_block_mask(doc_ids: torch.Tensor | None, q_len: int, kv_len: int | None = None,
                        device: torch.device | str | None = None) -> DocumentMask:
    """A document-causal mask for queries at slots kv_len - q_len .. kv_len - 1.

    doc_ids: (B, kv_len) document ids of every key slot (the cached ones first, then the new chunk),
        or None for plain causal attention. A query sees key slot j when j <= its own slot and both
        lie in the same document (run of equal ids).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if kv_len is None:  # every slot doc_ids covers (the queries are the last q_len of them)
        kv_len = doc_ids.shape[1] if doc_ids is not None else q_len
    offset = kv_len - q_len
    segments = None
    if doc_ids is None:
        def mask_mod(b, h, q, kv):
            return kv <= q + offset

        B = None  # broadcast over the batch
    else:
        device = doc_ids.device
        if doc_ids.shape[1] != kv_len:
            raise ValueError(f"doc_ids cover {doc_ids.shape[1]} slots, expected kv_len={kv_len}")
        segments = segment_ids(doc_ids)  # (B, kv_len)

        def mask_mod(b, h, q, kv):
            return (kv <= q + offset) & (segments[b, q + offset] == segments[b, kv])

        B = doc_ids.shape[0]
    device = torch.device(device) if device is not None else torch.device("cpu")
    # on CUDA, compiling the mask construction avoids materialising a (B, T, T) boolean tensor
    block_mask = create_block_mask(mask_mod, B, None, q_len, kv_len, device=device,
                                   _compile=device.type == "cuda")
    return DocumentMask(block_mask, segments, q_len, kv_len)


_FLEX_AVAILABLE = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def uses_flex(backend: str, device: torch.device, cached: bool) -> bool:
    """Whether a forward over packed documents takes FlexAttention: always with backend "flex"; with
    "auto" for packed training on CUDA (an uncached forward with autograd on: one shape per run), where
    the dense mask would cost T x T per row and head. Forwards without autograd (scoring, generation)
    come in many shapes, each of which would compile a block mask and a kernel: they stay on SDPA
    (with the K/V heads repeated under a mask, `attention._sdpa`)."""
    if backend == "flex":
        return True
    return (backend == "auto" and device.type == "cuda" and not cached and torch.is_grad_enabled()
            and _FLEX_AVAILABLE)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    from polyglu.model.compiler import compile_fn

    return compile_fn(flex_attention, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
    """q: (B, H, T, hd); k, v: (B, Hkv, S, hd) (GQA when H > Hkv). Returns (B, H, T, hd)."""
    from torch.nn.attention import flex_attention as flex_module

    gqa = q.shape[1] != k.shape[1]
    device_type = q.device.type
    if device_type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # FlexAttention has no backward on CPU (torch <= 2.13 raises NotImplementedError): training
        # on CPU takes SDPA with the equivalent dense mask, so a flex model still trains anywhere
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=gqa)
    # RMSNorm (QK-norm) returns float32 under autocast while v comes out of a bf16 matmul; SDPA is
    # on autocast's cast list but flex_attention is not, so cast to one dtype here
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else v.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if torch.compiler.is_compiling():  # inside a compiled block: trace the op itself
        return flex_module.flex_attention(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    if device_type == "cpu":
        with warnings.catch_warnings():
            # the "called without torch.compile" notice: the unfused CPU path is deliberate (tests)
            warnings.simplefilter("ignore", UserWarning)
            return flex_module.flex_attention(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    return _compiled_flex_attention()(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
