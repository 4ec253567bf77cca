"""PolychromaticLM: causality, documents, determinism, cache exactness, init, parameter counts."""

import math

import pytest
import torch

from polyglu import ModelConfig, PolychromaticLM
from polyglu.inference.cache import KVCache
from polyglu.model.parameters import parameter_counts


def _model(config: ModelConfig, **overrides) -> PolychromaticLM:
    model = PolychromaticLM(config.replace(**overrides) if overrides else config)
    with torch.no_grad():  # non-trivial routing
        for ffn in model.polyglu_layers():
            ffn.alpha.normal_(0, 1.0)
            ffn.beta.uniform_(0.5, 2.0)
            ffn.gate_net[2].weight.normal_(0, 1.0)
    model.set_tau(0.5)
    return model


def _forward(model, ids, doc_ids=None, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return model(ids, doc_ids).logits


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("packed", [False, True])
def test_causal_routing_no_future_leak(tiny_config, mode, packed):
    model = _model(tiny_config)
    getattr(model, mode)()
    ids = torch.randint(0, 97, (2, 20))
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 13 + [1] * 7]) if packed else None
    t = 10
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, 97, (2, 20 - t - 1))
    a = _forward(model, ids, doc_ids, seed=3)
    b = _forward(model, changed, doc_ids, seed=3)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_sequence_pool_leaks_future_as_documented(tiny_config):
    model = _model(tiny_config, routing_pool="sequence").eval()
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 97
    a, b = _forward(model, ids), _forward(model, changed)
    assert not torch.allclose(a[:, :15], b[:, :15], atol=1e-6)


@pytest.mark.parametrize("pool", ["causal", "token"])
def test_packed_documents_do_not_see_each_other(tiny_config, pool):
    model = _model(tiny_config, routing_pool=pool).eval()
    first, second = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = _forward(model, torch.cat([first, second], 1), torch.tensor([[0] * 7 + [1] * 9]))
    torch.testing.assert_close(packed[:, :7], _forward(model, first), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 7:], _forward(model, second), atol=1e-5, rtol=1e-5)


RETURNING_ID = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0]])  # the third document reuses the first one's id


@pytest.mark.parametrize("pool", ["causal", "token", "sequence"])
def test_a_returning_document_id_starts_a_new_document(tiny_config, pool):
    """A document is a run of equal ids: the third run never sees the first, though its id is the same."""
    model = _model(tiny_config, routing_pool=pool).eval()
    ids = torch.randint(0, 97, (1, 9))
    packed = _forward(model, ids, RETURNING_ID)
    for start in (0, 3, 6):
        alone = _forward(model, ids[:, start:start + 3])
        torch.testing.assert_close(packed[:, start:start + 3], alone, atol=1e-5, rtol=1e-5)


def test_sequence_pool_mean_stays_inside_a_run():
    from polyglu.model.polyglu import PolyGLU

    ffn = PolyGLU(16, 24, gate_hidden=8, routing_pool="sequence").eval()
    x = torch.randn(1, 9, 16)
    packed = ffn.dynamic_logits(x, doc_ids=RETURNING_ID)  # (1, 9, K)
    third = ffn.dynamic_logits(x[:, 6:])  # (1, 1, K): the third document alone
    torch.testing.assert_close(packed[:, 6:], third.expand(1, 3, -1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunks", [[9], [3, 3, 3], [4, 5], [2, 5, 2], [1] * 9])
def test_cached_chunks_treat_a_returning_id_as_a_new_document(tiny_config, chunks):
    model = _model(tiny_config).eval()
    ids = torch.randint(0, 97, (2, 9))
    full = _forward(model, ids, RETURNING_ID.expand(2, 9))
    cache = KVCache.for_model(model, 2, 16)
    outs, start = [], 0
    for n in chunks:
        outs.append(model(ids[:, start:start + n], RETURNING_ID.expand(2, 9)[:, start:start + n], cache=cache).logits)
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    # a token without doc_ids continues the last (third) document, which never saw the first
    nxt = torch.randint(0, 97, (2, 1))
    step = model(nxt, cache=cache).logits
    alone = _forward(model, torch.cat([ids[:, 6:], nxt], 1))[:, -1:]
    torch.testing.assert_close(step, alone, atol=1e-5, rtol=1e-5)


def test_eval_forward_is_deterministic(tiny_config):
    model = _model(tiny_config).eval()
    ids = torch.randint(0, 97, (2, 16))
    assert torch.equal(_forward(model, ids, seed=1), _forward(model, ids, seed=2))


@pytest.mark.parametrize("chunks", [[12], [5, 1, 1, 3, 1, 1], [1] * 12])
def test_cached_forward_matches_full_forward(tiny_config, chunks):
    model = _model(tiny_config).eval()
    ids = torch.randint(0, 97, (2, sum(chunks)))
    full = _forward(model, ids)
    cache = KVCache.for_model(model, 2, 32)
    outs, start = [], 0
    for n in chunks:
        outs.append(model(ids[:, start:start + n], cache=cache).logits)
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_with_left_padding_document(tiny_config):
    """Left padding given as its own document leaves the real tokens' logits unchanged."""
    model = _model(tiny_config).eval()
    prompt = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    cache = KVCache.for_model(model, 1, 16)
    out = model(padded, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]]), cache=cache).logits[:, 3:]
    torch.testing.assert_close(out, _forward(model, prompt), atol=1e-5, rtol=1e-5)
    nxt = torch.randint(0, 97, (1, 1))
    step = model(nxt, cache=cache).logits
    torch.testing.assert_close(step, _forward(model, torch.cat([prompt, nxt], 1))[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"routing_pool": "token"}, {"ffn": "swiglu"}])
def test_decode_step_matches_full_forward_after_padded_and_packed_prefill(tiny_config, overrides):
    """The fixed-shape decode step (attention over every cache slot under a mask) continues each
    row's last document exactly: left padding, a returning id and plain rows in one batch."""
    model = _model(tiny_config, **overrides).eval()
    P, steps = 9, 6
    doc_ids = torch.cat([torch.tensor([[-1, -1, -1, 0, 0, 0, 0, 0, 0]]), RETURNING_ID, torch.zeros(1, 9).long()])
    ids = torch.randint(0, 97, (3, P + steps))
    cache = KVCache.for_model(model, 3, P + steps)
    model(ids[:, :P], doc_ids, cache=cache)
    logits = torch.stack([model.decode_step(ids[:, t:t + 1], cache) for t in range(P, P + steps)], 1)
    first_of_last_document = [3, 6, 0]
    for row, start in enumerate(first_of_last_document):
        alone = _forward(model, ids[row:row + 1, start:])[:, P - start:]
        torch.testing.assert_close(logits[row:row + 1], alone, atol=1e-5, rtol=1e-5)
    assert cache.length == P + steps and int(cache.filled) == P + steps
    with pytest.raises(ValueError, match="overflow"):
        model.decode_step(ids[:, :1], cache)


def test_decode_step_on_an_empty_cache_starts_at_position_zero(tiny_config):
    model = _model(tiny_config).eval()
    ids = torch.randint(0, 97, (2, 4))
    cache = KVCache.for_model(model, 2, 8)
    logits = torch.stack([model.decode_step(ids[:, t:t + 1], cache) for t in range(4)], 1)
    torch.testing.assert_close(logits, _forward(model, ids), atol=1e-5, rtol=1e-5)


def test_sequence_pool_refuses_cache(tiny_config):
    model = _model(tiny_config, routing_pool="sequence").eval()
    with pytest.raises(ValueError, match="non-causal"):
        model(torch.randint(0, 97, (1, 4)), cache=KVCache.for_model(model, 1, 8))


def test_too_long_input_is_an_error(tiny_config):
    model = PolychromaticLM(tiny_config)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, tiny_config.max_seq_len + 1, dtype=torch.long))


def test_init_follows_the_paper(tiny_config):
    config = tiny_config.replace(d_model=256, d_ff=512, n_heads=8, head_dim=32, n_kv_heads=4, n_layers=4)
    model = PolychromaticLM(config)
    residual = 0.02 / math.sqrt(2 * config.n_layers)
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].attn.o_proj.weight.std().item() - residual) < 0.1 * residual
    assert abs(model.layers[0].ffn.down_proj.weight.std().item() - residual) < 0.1 * residual
    ffn = model.layers[0].ffn
    assert torch.equal(ffn.alpha, torch.zeros_like(ffn.alpha)) and torch.equal(ffn.beta, torch.ones(4))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_paper_parameter_counts():
    with torch.device("meta"):
        model = PolychromaticLM(ModelConfig.from_preset("paper-600m"))
    counts = parameter_counts(model)
    assert counts["total"] == 597_153_888
    assert counts["routing"] == 1_380_960
    assert round(100 * counts["routing_share"], 3) == 0.231


def test_swiglu_model_has_no_routing(tiny_config):
    model = PolychromaticLM(tiny_config.replace(ffn="swiglu"))
    counts = parameter_counts(model)
    assert counts["routing"] == 0 and model.polyglu_layers() == [] and model.tau is None
    out = model(torch.randint(0, 97, (1, 5)), return_routing=True)
    assert out.routing == [None, None]


def test_return_routing_and_hidden(tiny_config):
    model = _model(tiny_config).eval()
    out = model(torch.randint(0, 97, (2, 5)), return_routing=True, compute_logits=False)
    assert out.logits is None and out.hidden_states.shape == (2, 5, tiny_config.d_model)
    assert len(out.routing) == tiny_config.n_layers and out.routing[0].shape == (2, 5, 48, 4)


def test_set_tau_updates_every_layer(tiny_config):
    model = PolychromaticLM(tiny_config)
    model.set_tau(0.25)
    assert all(float(f.tau) == 0.25 for f in model.polyglu_layers()) and model.tau == 0.25


def test_decode_layout_keeps_values_parameters_and_state_dict(tiny_config, tmp_path):
    """use_decode_layout changes only the strides of the linear weights: same parameters, same
    state dict, the same logits to float tolerance, and a model that still trains and saves."""
    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
    assert model.use_decode_layout() and not model.use_decode_layout()  # idempotent
    assert dict(model.named_parameters()) == params  # the same Parameter objects (optimizers keep them)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    heads = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in heads if min(w.shape) > 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    model.train()
    loss = model(ids).logits.logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
    assert model.use_decode_layout(columns=False) and all(w.is_contiguous() for w in heads)
    model.use_decode_layout()
    model.save_pretrained(tmp_path / "m")
    loaded = PolychromaticLM.from_pretrained(tmp_path / "m")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# ---- SDPA with a mask on CUDA: never the math backend


def test_masked_gqa_attention_on_cuda_repeats_kv_heads(monkeypatch):
    """On CUDA SDPA takes a mask together with enable_gqa only in its math backend (fp32 scores per
    head); with a mask the K/V heads are repeated and enable_gqa is not passed. Same values."""
    from polyglu.model import attention

    B, H, Hkv, T, hd = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append((k.shape[1], kwargs))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    on_cuda = attention._sdpa(q, k, v, mask, False, H // Hkv, device_type="cuda")
    assert calls[-1][0] == H and "enable_gqa" not in calls[-1][1]  # repeated heads, no GQA flag
    on_cpu = attention._sdpa(q, k, v, mask, False, H // Hkv)  # CPU: grouped heads, no copies
    assert calls[-1][0] == Hkv or not attention._SDPA_HAS_GQA
    causal = attention._sdpa(q, k, v, None, True, H // Hkv, device_type="cuda")  # no mask: flash takes GQA
    assert calls[-1][0] == Hkv or not attention._SDPA_HAS_GQA
    torch.testing.assert_close(on_cuda, on_cpu)
    torch.testing.assert_close(on_cuda, causal)  # the mask above is the causal one


def test_positions_are_checked_without_a_host_sync_in_training(model):
    """A packed chunk no longer than max_seq_len has positions < max_seq_len: the forward reads nothing
    on the host for the check (a sync per step on CUDA); a longer chunk is still checked."""
    T = model.config.max_seq_len
    ids = torch.zeros(1, T, dtype=torch.long)
    doc_ids = torch.zeros(1, T, dtype=torch.long)
    real_max = torch.Tensor.max
    reads = []

    def counting_max(self, *args, **kwargs):
        reads.append(self.dtype)
        return real_max(self, *args, **kwargs)

    with torch.no_grad():
        torch.Tensor.max = counting_max
        try:
            model(ids, doc_ids, compute_logits=False)
        finally:
            torch.Tensor.max = real_max
    assert torch.long not in reads
    with pytest.raises(ValueError, match="beyond max_seq_len"):
        model(torch.zeros(1, T + 1, dtype=torch.long), torch.zeros(1, T + 1, dtype=torch.long))
