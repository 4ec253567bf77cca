"""FlexAttention backend: document-causal BlockMask == the dense SDPA mask; config validation."""

import pytest
import torch
import torch.nn.functional as F

from polyglu.config import ConfigError, ModelConfig
from polyglu.documents import segment_ids
from polyglu.inference.cache import KVCache
from polyglu.model import flex


def _dense_document_mask(doc_ids, q_len):
    """The reference: key slot j visible to query slot i when j <= i and both in one run of equal ids."""
    S = doc_ids.shape[1]
    segments = segment_ids(doc_ids)
    q_slot = torch.arange(S - q_len, S)
    causal = torch.arange(S)[None, :] <= q_slot[:, None]  # (T, S)
    same = segments[:, q_slot, None] == segments[:, None, :]  # (B, T, S)
    return (causal & same)[:, None]


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
    assert ModelConfig.from_preset("debug").attention_backend == "auto"
    assert ModelConfig.from_preset("debug", attention_backend="flex").attention_backend == "flex"
    with pytest.raises(ConfigError, match="attention_backend must be one of sdpa, flex"):
        ModelConfig.from_preset("debug", attention_backend="flash")


def test_flex_on_old_torch_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(ConfigError, match=r"attention_backend='flex' needs PyTorch >= 2.5.*torch 2.4.1"):
        ModelConfig.from_preset("debug", attention_backend="flex")
    assert ModelConfig.from_preset("debug").attention_backend == "auto"  # auto (sdpa there) still fine
    assert not flex.uses_flex("auto", torch.device("cuda"), cached=False) or flex._FLEX_AVAILABLE


# ---- the model with attention_backend="flex"


def _pair(tiny_config):
    """The same weights under both backends."""
    from polyglu import PolychromaticLM

    torch.manual_seed(0)
    sdpa = PolychromaticLM(tiny_config).eval()
    flex_model = PolychromaticLM(tiny_config.replace(attention_backend="flex")).eval()
    flex_model.load_state_dict(sdpa.state_dict())
    return sdpa, flex_model


def _packed(B=3, T=40, vocab=97):
    ids = torch.randint(0, vocab, (B, T))
    doc_ids = torch.tensor([[0] * 9 + [1] * 17 + [0] * 14,  # the id 0 returns: a third document
                            [5] * 3 + [6] * 30 + [7] * 7,
                            [2] * 40])[:B, :T]
    return ids, doc_ids


def _masks_seen(model):
    seen = []
    for block in model.layers:
        block.attn.register_forward_pre_hook(lambda m, args: seen.append(type(args[3]).__name__))
    return seen


def test_flex_model_matches_sdpa_logits_on_packed_documents(tiny_config):
    sdpa, flex_model = _pair(tiny_config)  # tiny_config: GQA 4 heads over 2
    ids, doc_ids = _packed()
    seen = _masks_seen(flex_model)
    with torch.no_grad():
        expected = sdpa(ids, doc_ids).logits
        got = flex_model(ids, doc_ids).logits
    assert seen == ["DocumentMask"] * tiny_config.n_layers  # the flex branch really ran
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and a packed row equals its documents run one by one
    with torch.no_grad():
        alone = flex_model(ids[:1, 9:26]).logits
    torch.testing.assert_close(got[:1, 9:26], alone, atol=1e-5, rtol=1e-5)


def test_flex_cached_chunks_match_uncached(tiny_config):
    _, flex_model = _pair(tiny_config)
    ids, doc_ids = _packed()
    with torch.no_grad():
        full = flex_model(ids, doc_ids).logits
        cache = KVCache.for_model(flex_model, ids.shape[0], ids.shape[1])
        pieces = [flex_model(ids[:, a:b], doc_ids[:, a:b], cache=cache).logits
                  for a, b in ((0, 12), (12, 13), (13, 30), (30, 40))]  # chunks across document edges
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_flex_generation_cached_equals_recompute(tiny_config):
    from polyglu import generate

    _, flex_model = _pair(tiny_config)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]  # left padding: a document of its own
    cached = generate(flex_model, prompts, 6, eos_token_id=[], return_logits=True)
    recompute = generate(flex_model, prompts, 6, eos_token_id=[], use_cache=False, return_logits=True)
    assert cached.tokens.tolist() == recompute.tokens.tolist()
    torch.testing.assert_close(cached.logits, recompute.logits, atol=1e-4, rtol=1e-4)


def test_flex_model_trains_on_cpu_with_sdpa_gradients(tiny_config):
    sdpa, flex_model = _pair(tiny_config)
    ids, doc_ids = _packed()
    for model in (sdpa, flex_model):
        model.train()
        torch.manual_seed(1)  # the same Gumbel routing noise for both
        model(ids, doc_ids).logits.square().mean().backward()
    for (name, a), b in zip(sdpa.named_parameters(), flex_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_blocks_run_flex_without_recompiling_per_batch(tiny_config):
    # what train.compile=true does on a GPU: per-block torch.compile, bf16 autocast, a new document
    # mask every batch. On CPU this runs inference (no flex backward here); ~30 s of CPU compiling.
    from torch._dynamo.utils import counters

    sdpa, flex_model = _pair(tiny_config.replace(max_seq_len=128))
    for block in flex_model.layers:
        block.compile()
    ids = torch.randint(0, 97, (2, 128))
    counters.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for step in range(3):
            doc_ids = torch.zeros(2, 128, dtype=torch.long)
            doc_ids[0, 40 + 7 * step:] = 1
            doc_ids[1, 90 - 5 * step:] = 4
            torch.testing.assert_close(flex_model(ids, doc_ids).logits.float(), sdpa(ids, doc_ids).logits.float(),
                                       atol=2e-2, rtol=2e-2)
    assert counters["stats"]["unique_graphs"] == 1  # the blocks share one graph, whatever the documents


# ---- "auto": FlexAttention for packed training on CUDA, SDPA elsewhere


def test_auto_takes_flex_only_for_packed_training_on_cuda(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert flex.uses_flex("auto", cuda, cached=False)  # packed training
    assert not flex.uses_flex("auto", cuda, cached=True)  # generation: one block mask per prompt length
    with torch.no_grad():  # scoring, validation: many shapes, each a compile
        assert not flex.uses_flex("auto", cuda, cached=False)
    assert not flex.uses_flex("auto", cpu, cached=False)  # no flex backward on CPU
    assert flex.uses_flex("flex", cpu, cached=True) and not flex.uses_flex("sdpa", cuda, cached=False)
    monkeypatch.setattr(flex, "_FLEX_AVAILABLE", False)  # torch 2.4: auto is sdpa everywhere
    assert not flex.uses_flex("auto", cuda, cached=False)


def test_auto_model_builds_a_block_mask_where_flex_is_chosen(monkeypatch, tiny_config):
    """The forward asks `uses_flex` (with the input's device): when it says flex, every layer gets one
    DocumentMask; the logits equal the sdpa model's."""
    from polyglu.model import transformer
    from polyglu.model.transformer import PolychromaticLM

    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config.replace(attention_backend="auto")).eval()
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [2] * 12])
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    seen = []
    original = flex.flex_attention

    def recording(q, k, v, mask):
        seen.append(mask)
        return original(q, k, v, mask)

    monkeypatch.setattr("polyglu.model.attention.flex_attention", recording)
    with torch.no_grad():
        sdpa_logits = model(ids, doc_ids).logits  # on CPU, auto is sdpa
        assert seen == []
        monkeypatch.setattr(transformer, "uses_flex", lambda backend, device, cached: backend == "auto")
        flex_logits = model(ids, doc_ids).logits
    assert len(seen) == tiny_config.n_layers and isinstance(seen[0], flex.DocumentMask)
    torch.testing.assert_close(flex_logits, sdpa_logits, atol=1e-5, rtol=1e-5)
