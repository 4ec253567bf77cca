"""PolyGLU module semantics: routing, noise, determinism, SwiGLU exactness, gradients."""

import pytest
import torch

from polyglu import PolyGLU, SwiGLU
from polyglu.config import ConfigError, ModelConfig
from polyglu.model.polyglu import GLU, PoolState, routing_weights


def _randomise_routing(m: PolyGLU) -> PolyGLU:
    with torch.no_grad():
        m.alpha.normal_(0, 1.0)
        m.beta.uniform_(0.5, 2.0)
        m.tau.fill_(0.5)
    return m


@pytest.mark.parametrize("pool", ["causal", "sequence", "token"])
def test_shapes_and_routing_sums_to_one(pool):
    m = _randomise_routing(PolyGLU(16, 24, gate_hidden=8, routing_pool=pool)).eval()
    x = torch.randn(3, 7, 16)
    y, g = m(x, return_routing=True)
    assert y.shape == (3, 7, 16)
    assert g.shape == (3, 1 if pool == "sequence" else 7, 24, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]))


def test_eval_is_deterministic_and_training_is_noisy():
    m = _randomise_routing(PolyGLU(16, 24, gate_hidden=8))
    x = torch.randn(2, 5, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)
    torch.manual_seed(1)
    assert torch.equal(a, m(x))


def test_noise_is_shared_across_positions():
    """Gumbel noise is drawn per (sequence, neuron, activation): with token pooling and a constant
    input along the sequence, every position gets the same routing."""
    m = _randomise_routing(PolyGLU(8, 12, gate_hidden=4, routing_pool="token")).train()
    x = torch.randn(2, 1, 8).expand(2, 6, 8).contiguous()
    _, g = m(x, return_routing=True)
    assert torch.allclose(g, g[:, :1].expand_as(g))
    assert not torch.allclose(g[0], g[1])  # different sequences, different noise


def test_hard_eval_routing_is_one_hot():
    m = _randomise_routing(PolyGLU(8, 12, gate_hidden=4, eval_routing="hard")).eval()
    _, g = m(torch.randn(2, 5, 8), return_routing=True)
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(g.sum(-1), torch.ones(g.shape[:-1]))


def test_single_silu_activation_is_swiglu_bitwise():
    poly = PolyGLU(32, 48, activations=("silu",), gate_hidden=8)
    swi = SwiGLU(32, 48)
    swi.load_state_dict({k: v for k, v in poly.state_dict().items() if k.split(".")[0].endswith("proj")})
    x = torch.randn(3, 9, 32)
    for mode in ("train", "eval"):
        getattr(poly, mode)()
        getattr(swi, mode)()
        assert torch.equal(poly(x), swi(x))


def test_gradients_reach_routing_parameters():
    m = _randomise_routing(PolyGLU(16, 24, gate_hidden=8)).train()
    m(torch.randn(2, 5, 16)).pow(2).sum().backward()
    for name in ("alpha", "beta", "gate_net.0.weight", "gate_net.0.bias", "gate_net.2.weight", "gate_net.2.bias"):
        grad = m.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_causal_pool_sees_no_future():
    m = _randomise_routing(PolyGLU(16, 24, gate_hidden=8, routing_pool="causal")).eval()
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 16)
    torch.testing.assert_close(m(x)[:, :6], m(x2)[:, :6], rtol=0, atol=0)


def test_causal_pool_resets_at_documents():
    m = _randomise_routing(PolyGLU(16, 24, gate_hidden=8, routing_pool="causal")).eval()
    a, b = torch.randn(1, 4, 16), torch.randn(1, 5, 16)
    packed = m(torch.cat([a, b], 1), doc_ids=torch.tensor([[0] * 4 + [1] * 5]))
    torch.testing.assert_close(packed[:, 4:], m(b), atol=1e-6, rtol=1e-5)


def test_routing_weights_formula():
    alpha = torch.randn(5, 3)
    dynamic = torch.randn(2, 4, 3)
    tau = torch.tensor(0.3)
    g = routing_weights(alpha, dynamic, None, tau)
    expected = torch.softmax((alpha[None, None] + dynamic[:, :, None]) / 0.3, -1)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("kwargs,match", [
    (dict(activations=()), "at least one"),
    (dict(activations=("relu", "swish")), "unknown activation 'swish'"),
    (dict(routing_pool="mean"), "routing_pool"),
    (dict(eval_routing="argmax"), "eval_routing"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PolyGLU(8, 8, **kwargs)


def test_glu_baselines_share_parameter_names():
    names = {n for n, _ in SwiGLU(8, 12).named_parameters()}
    assert names == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert names < {n for n, _ in PolyGLU(8, 12).named_parameters()}
    x = torch.randn(1, 3, 8)
    g = GLU(8, 12, "gelu")
    torch.testing.assert_close(g(x), g.down_proj(torch.nn.functional.gelu(g.gate_proj(x)) * g.up_proj(x)))


def test_ablation_routing_modes():
    static = PolyGLU(8, 12, gate_hidden=4, routing_mode="static")
    assert static.gate_net is None and static.beta is None
    names = {n for n, _ in static.named_parameters()}
    assert "alpha" in names and not any(n.startswith(("gate_net", "beta")) for n in names)
    with torch.no_grad():
        static.alpha.normal_()
    _, g = static.eval()(torch.randn(2, 5, 8), return_routing=True)
    torch.testing.assert_close(g[0, 0], torch.softmax(static.alpha / static.tau, -1))  # input-independent

    dynamic = PolyGLU(8, 12, gate_hidden=4, routing_mode="dynamic")
    assert "alpha" not in {n for n, _ in dynamic.named_parameters()} and "alpha" in dynamic.state_dict()
    dynamic.train()(torch.randn(2, 5, 8)).sum().backward()
    assert dynamic.gate_net[0].weight.grad is not None and torch.equal(dynamic.alpha, torch.zeros(12, 4))
    with pytest.raises(ConfigError, match="routing_mode"):
        PolyGLU(8, 8, routing_mode="none")


def test_from_config_builds_the_configured_block():
    config = ModelConfig.from_preset("debug", activations=("gelu", "silu"), gate_hidden=8, routing_pool="token",
                                     eval_routing="hard", routing_noise=False, tau=0.5, routing_mode="static")
    block = PolyGLU.from_config(config)
    assert (block.d_model, block.d_ff, block.activations) == (64, 192, ("gelu", "silu"))
    assert (block.routing_pool, block.eval_routing, block.routing_noise, block.routing_mode) == \
        ("token", "hard", False, "static")
    assert float(block.tau) == 0.5 and block.gate_net is None
    baseline = GLU.from_config(config.replace(ffn="geglu"))
    assert type(baseline) is GLU and baseline.activation == "gelu" and baseline.d_ff == 192


def _decode_tokens(block, x, positions):
    """Feed x (B, T, d) one token at a time through `block` with a causal-pool state."""
    from polyglu.model.polyglu import PoolState

    state = PoolState(torch.zeros(x.shape[0], block.gate_net[0].out_features))
    outs = [block(x[:, t:t + 1], positions=positions[:, t:t + 1], pool_state=state) for t in range(x.shape[1])]
    return torch.cat(outs, 1), state


def test_one_token_routing_continues_the_state_in_place_and_equals_the_full_forward():
    from polyglu.model.layers import document_positions

    block = _randomise_routing(PolyGLU(16, 24, gate_hidden=8)).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        one_document = torch.zeros(2, 7, dtype=torch.long)
        stepped, state = _decode_tokens(block, x, document_positions(one_document))
        # (the kernel factorises per-token routing over a chunk and not for one token: equal to rounding)
        torch.testing.assert_close(stepped, block(x, one_document), atol=1e-6, rtol=1e-5)
        # a document starting mid-row restarts the running mean
        packed = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
        stepped, state = _decode_tokens(block, x, document_positions(packed))
        torch.testing.assert_close(stepped, block(x, packed), atol=1e-6, rtol=1e-5)
        total_before = state.total
        block(x[:, :1], positions=torch.tensor([[4], [7]]), pool_state=state)
    assert state.total is total_before  # updated in place: a compiled decode step keeps its address


def test_a_decode_steps_shared_restart_flags_and_counts_equal_the_positions_own():
    """KVCache.step_view hands every layer the step's restart flags and counts (computed once); the
    running sums are the cache's own tensors, and the cache's states never keep a step's values."""
    from polyglu.inference.cache import KVCache

    block = _randomise_routing(PolyGLU(16, 24, gate_hidden=8)).eval()
    config = ModelConfig.from_preset("debug", d_model=16, d_ff=24, gate_hidden=8, n_layers=1)
    cache = KVCache(config, batch_size=3, max_len=8)
    cache.pool[0].total.normal_()
    positions = torch.tensor([[0], [1], [5]])  # a row starting its document, two continuing
    view = cache.step_view(positions)
    shared = view.pool[0]
    assert shared.total is cache.pool[0].total and cache.pool[0].keep is None and cache.pool[0].count is None
    assert shared.keep.tolist() == [[0.0], [1.0], [1.0]] and shared.count.tolist() == [[1.0], [2.0], [6.0]]
    derived = PoolState(cache.pool[0].total.clone())
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        expected = block(x, positions=positions, pool_state=derived)
        got = block(x, positions=positions, pool_state=shared)
    assert torch.equal(got, expected) and torch.equal(cache.pool[0].total, derived.total)


@pytest.mark.slow
def test_one_token_routing_compiles_whole():
    """torch.compile(fullgraph=True) of a one-token step: no graph break, no host sync (C++ compiler)."""
    from polyglu.model.polyglu import PoolState

    block = _randomise_routing(PolyGLU(16, 24, gate_hidden=8)).eval()
    step = torch.compile(lambda x, positions, state: block(x, positions=positions, pool_state=state), fullgraph=True)
    x, positions = torch.randn(2, 3, 16), torch.tensor([[0, 1, 2], [4, 0, 1]])
    eager_state = PoolState(torch.randn(2, 8))
    compiled_state = PoolState(eager_state.total.clone())
    with torch.no_grad():
        for t in range(3):
            expected = block(x[:, t:t + 1], positions=positions[:, t:t + 1], pool_state=eager_state)
            got = step(x[:, t:t + 1], positions[:, t:t + 1], compiled_state)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_state.total, eager_state.total, atol=1e-5, rtol=1e-5)
