"""FlexAttention backend: document-causal BlockMask == the dense SDPA mask; config validation."""

import pytest
import torch
import torch.nn.functional as F

from polyglu.config import ConfigError, ModelConfig
from polyglu.model import flex


def _dense_document_mask(doc_ids, q_len):
    """The reference: key slot j visible to query slot i when j <= i and both in one run of equal ids."""
    S = doc_ids.shape[1]
    segments = flex.document_segments(doc_ids)
    q_slot = torch.arange(S - q_len, S)
    causal = torch.arange(S)[None, :] <= q_slot[:, None]  # (T, S)
    same = segments[:, q_slot, None] == segments[:, None, :]  # (B, T, S)
    return (causal & same)[:, None]


def test_segments_are_runs_of_equal_ids():
    doc_ids = torch.tensor([[3, 3, 5, 5, 3, 3], [0, 0, 0, 0, 0, 0]])
    assert flex.document_segments(doc_ids).tolist() == [[0, 0, 1, 1, 2, 2], [0] * 6]


@pytest.mark.parametrize("q_len", [70, 5])  # whole rows (prefill/training), a chunk after cached slots
def test_flex_matches_sdpa_on_packed_documents(q_len):
    B, H, Hkv, S, hd = 3, 4, 2, 70, 8
    # several documents per row; the id 1 comes back after 2 (a new document); one row is one document
    doc_ids = torch.tensor([[0] * 20 + [1] * 25 + [2] * 15 + [1] * 10,
                            [7] * 3 + [8] * 67,
                            [4] * 70])
    q = torch.randn(B, H, q_len, hd)
    k, v = torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)
    block_mask = flex.document_block_mask(doc_ids, q_len, S)
    out = flex.flex_attention(q, k, v, block_mask)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=_dense_document_mask(doc_ids, q_len))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_without_documents_is_causal():
    q, k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    out = flex.flex_attention(q, k, v, flex.document_block_mask(None, 9))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_flex_trains_on_cpu_through_the_sdpa_fallback():
    # FlexAttention has no CPU backward; with gradients the backend falls back to SDPA + dense mask
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    flex.flex_attention(q, k, v, flex.document_block_mask(doc_ids, 16)).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_document_mask(doc_ids, 16)).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)


def test_flex_casts_to_the_autocast_dtype():
    # QK-norm gives float32 q/k while v comes out of a bf16 matmul under autocast
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    v = torch.randn(1, 2, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flex.flex_attention(q, k, v, flex.document_block_mask(None, 8))
    assert out.dtype == torch.bfloat16


def test_dense_form_of_the_mask():
    doc_ids = torch.tensor([[1, 1, 2, 2, 1]])
    mask = flex.document_block_mask(doc_ids, 2, 5)
    assert mask.dense()[0, 0].int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert mask.dense().equal(_dense_document_mask(doc_ids, 2))


def test_attention_backend_is_validated():
    assert ModelConfig.from_preset("debug").attention_backend == "sdpa"
    assert ModelConfig.from_preset("debug", attention_backend="flex").attention_backend == "flex"
    with pytest.raises(ConfigError, match="attention_backend must be one of sdpa, flex"):
        ModelConfig.from_preset("debug", attention_backend="flash")


def test_flex_on_old_torch_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(ConfigError, match=r"attention_backend='flex' needs PyTorch >= 2.5.*torch 2.4.1"):
        ModelConfig.from_preset("debug", attention_backend="flex")
    assert ModelConfig.from_preset("debug").attention_backend == "sdpa"  # sdpa still fine there
