"""routing_scope="neuron": per-neuron dynamic logits through a rank-r map, beside the paper's layer scope."""

import json

import pytest
import torch

from polyglu.config import ConfigError, ModelConfig
from polyglu.inference import generate
from polyglu.loading import load_model
from polyglu.model.parameters import parameter_counts
from polyglu.model.polyglu import PolyGLU, mixed_activation_reference
from polyglu.model.transformer import PolychromaticLM
from polyglu.train.optim import parameter_groups

PROMPTS = [[5, 9, 11, 3], [7, 2]]


def _config(**changes) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2, head_dim=8, max_seq_len=64,
                gate_hidden=8, init_std=0.1)
    return ModelConfig.from_preset("debug", **{**base, **changes})


def _perturb(model: PolychromaticLM, seed: int = 0) -> PolychromaticLM:
    """Non-trivial routing: random alpha, beta, gate_net output and (neuron scope) per-neuron maps."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.copy_(torch.randn(layer.alpha.shape, generator=gen))
            layer.beta.copy_(torch.rand(layer.beta.shape, generator=gen) + 0.5)
            layer.gate_net[2].weight.copy_(torch.randn(layer.gate_net[2].weight.shape, generator=gen))
            if layer.routing_map is not None:
                layer.routing_map.copy_(torch.randn(layer.routing_map.shape, generator=gen))
    model.set_tau(0.5)
    return model


def _neuron_model(**changes) -> PolychromaticLM:
    torch.manual_seed(0)
    return _perturb(PolychromaticLM(_config(routing_scope="neuron", **changes)))


# --------------------------------------------------------------------------------------------
# config and construction


def test_config_defaults_and_refusals():
    assert ModelConfig().routing_scope == "layer" and ModelConfig().routing_rank == 4
    with pytest.raises(ConfigError, match="routing_scope"):
        _config(routing_scope="unit")
    with pytest.raises(ConfigError, match="routing_rank"):
        _config(routing_scope="neuron", routing_rank=0)
    with pytest.raises(ConfigError, match="routing_mode='static'"):
        _config(routing_scope="neuron", routing_mode="static")


@pytest.mark.parametrize("rank", [2, 4, 7])
def test_shapes_and_parameter_counts(rank):
    layer_model = PolychromaticLM(_config())
    neuron_model = PolychromaticLM(_config(routing_scope="neuron", routing_rank=rank))
    ffn = neuron_model.polyglu_layers()[0]
    K, F, H = 4, 48, 8
    assert ffn.routing_map.shape == (F, K, rank) and ffn.gate_net[2].weight.shape == (rank, H)
    assert "routing_scope='neuron'" in repr(ffn)
    added = parameter_counts(neuron_model)["routing"] - parameter_counts(layer_model)["routing"]
    # the map d_ff * K * r, and gate_net's last layer r outputs instead of K
    assert added == neuron_model.config.n_layers * (F * K * rank + (rank - K) * (H + 1))
    # the map is routing, not decayed (its identity start is the layer scope)
    (decay, no_decay) = parameter_groups(neuron_model, 0.1)
    assert "layers.0.ffn.routing_map" in no_decay["names"]


def test_fresh_neuron_model_computes_the_layer_models_function():
    """At initialisation the map is the identity: a neuron-scope model starts as the paper's."""
    torch.manual_seed(3)
    layer_model = PolychromaticLM(_config(mixed_impl="reference")).eval()
    torch.manual_seed(3)
    neuron_model = PolychromaticLM(_config(mixed_impl="reference", routing_scope="neuron")).eval()
    ids = torch.randint(0, 97, (2, 13))
    assert torch.equal(layer_model(ids).logits, neuron_model(ids).logits)


def test_neurons_get_their_own_dynamic_logits():
    model = _neuron_model().eval()
    ids = torch.randint(0, 97, (2, 13))
    for layer, g in zip(model.polyglu_layers(), model(ids, return_routing=True).routing):
        assert g.shape == (2, 13, 48, 4)
        with torch.no_grad():
            dynamic = layer.dynamic_logits(torch.randn(2, 13, 32))  # (B, T, F, K)
        assert dynamic.shape == (2, 13, 48, 4)
        # per neuron: the dynamic part differs across neurons for the same token
        assert dynamic.std(dim=2).min() > 1e-3


def test_gradients_reach_the_map_and_make_neurons_differ():
    torch.manual_seed(0)
    model = PolychromaticLM(_config(routing_scope="neuron")).train()
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.normal_(0, 1.0)  # neurons differ, so do their gradients
    ids = torch.randint(0, 97, (4, 17))
    model(ids).logits.logsumexp(-1).mean().backward()
    grad = model.polyglu_layers()[0].routing_map.grad  # (F, K, r)
    assert grad is not None and grad.abs().max() > 0
    assert (grad - grad.mean(0)).abs().max() > 1e-6  # not one update shared by all neurons


# --------------------------------------------------------------------------------------------
# a layer-scope model continued per neuron


@pytest.fixture(scope="module")
def layer_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    model = _perturb(PolychromaticLM(_config()), seed=4)
    path = tmp_path_factory.mktemp("layer") / "model"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("rank", [4, 6])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_layer_checkpoint_loads_into_neuron_scope_with_identical_logits(layer_checkpoint, rank, impl):
    layer_model = load_model(layer_checkpoint, mixed_impl=impl)
    neuron_model = load_model(layer_checkpoint, mixed_impl=impl, routing_scope="neuron", routing_rank=rank)
    assert neuron_model.config.routing_scope == "neuron" and neuron_model.polyglu_layers()[0].routing_map is not None
    ids = torch.randint(0, 97, (2, 19))
    doc_ids = torch.tensor([[0] * 7 + [1] * 12, [0] * 19])
    with torch.no_grad():
        a, b = layer_model(ids, doc_ids).logits, neuron_model(ids, doc_ids).logits
    if impl == "reference":
        assert torch.equal(a, b)  # the same logits bit for bit
    else:  # the layer scope's fused kernel factorises the softmax; per neuron it cannot: float rounding
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_checkpoint_into_too_small_a_rank_is_refused(layer_checkpoint):
    with pytest.raises(ConfigError, match="routing_rank >= 4"):
        load_model(layer_checkpoint, routing_scope="neuron", routing_rank=3)


def test_neuron_checkpoint_round_trips(tmp_path):
    model = _neuron_model(routing_rank=5).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    ids = torch.randint(0, 97, (1, 9))
    assert loaded.config.routing_scope == "neuron" and loaded.config.routing_rank == 5
    assert torch.equal(model(ids).logits, loaded(ids).logits)


# --------------------------------------------------------------------------------------------
# everywhere the layer scope works


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("pool", ["causal", "token"])
def test_causal_pools_do_not_leak_the_future(mode, pool):
    model = _neuron_model(routing_pool=pool)
    getattr(model, mode)()
    ids = torch.randint(0, 97, (2, 20))
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    changed = ids.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % 97
    torch.manual_seed(3)
    a = model(ids, doc_ids).logits
    torch.manual_seed(3)
    b = model(changed, doc_ids).logits
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def _block_pair(pool: str, eval_routing: str) -> tuple[PolyGLU, PolyGLU]:
    torch.manual_seed(0)
    kwargs = dict(d_model=24, d_ff=40, gate_hidden=8, routing_pool=pool, eval_routing=eval_routing,
                  routing_scope="neuron", routing_rank=3, tau=0.6)
    fused_block, reference = PolyGLU(**kwargs), PolyGLU(mixed_impl="reference", **kwargs)
    with torch.no_grad():
        fused_block.alpha.normal_()
        fused_block.routing_map.normal_()
    reference.load_state_dict(fused_block.state_dict())
    return fused_block, reference


@pytest.mark.parametrize("pool", ["causal", "sequence", "token"])
@pytest.mark.parametrize("mode", ["train", "eval_soft", "eval_hard"])
def test_fused_kernel_equals_reference_on_every_pool(pool, mode):
    """Values and every gradient, Gumbel noise in training, soft and hard evaluation routing."""
    fused_block, reference = _block_pair(pool, "hard" if mode == "eval_hard" else "soft")
    x = torch.randn(2, 11, 24)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    noise = None
    for block in (fused_block, reference):
        block.train(mode == "train")
    if mode == "train":
        noise = -torch.empty(2, 40, 4).exponential_(generator=torch.Generator().manual_seed(2)).log_()
    results = []
    for block in (fused_block, reference):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = block(xi, doc_ids, noise=noise) if noise is not None else block(xi, doc_ids)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        if grads_ref[name] is None:
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    if mode != "eval_hard":
        assert grads["routing_map"].abs().max() > 0


def test_tau_and_gumbel_noise_act_per_neuron():
    layer = _block_pair("causal", "soft")[0].eval()
    x = torch.randn(1, 6, 24)
    _, g_soft = layer(x, return_routing=True)
    layer.tau.fill_(0.05)
    _, g_sharp = layer(x, return_routing=True)
    entropy = lambda g: -(g * g.clamp_min(1e-30).log()).sum(-1).mean()  # noqa: E731
    assert entropy(g_sharp) < entropy(g_soft)
    layer.train()
    torch.manual_seed(0)
    _, g_a = layer(x, return_routing=True)
    torch.manual_seed(1)
    _, g_b = layer(x, return_routing=True)
    assert not torch.equal(g_a, g_b)  # noise in training only
    layer.eval()
    assert torch.equal(layer(x, return_routing=True)[1], layer(x, return_routing=True)[1])


@pytest.mark.parametrize("overrides", [{}, {"routing_pool": "token"}, {"eval_routing": "hard"},
                                       {"routing_mode": "dynamic"}])
def test_cached_decoding_equals_recompute(overrides):
    model = _neuron_model(vocab_size=260, **overrides).eval()
    cached = generate(model, PROMPTS, 12, return_logits=True, eos_token_id=[])
    full = generate(model, PROMPTS, 12, use_cache=False, return_logits=True, eos_token_id=[])
    assert cached.used_cache
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.logits, full.logits, atol=1e-4, rtol=1e-4)


def test_sequence_pool_is_recomputed_not_cached():
    model = _neuron_model(vocab_size=260, routing_pool="sequence").eval()
    out = generate(model, PROMPTS, 6, eos_token_id=[])
    assert not out.used_cache


def test_bfloat16_model_and_autocast_training():
    model = _neuron_model().eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        half = model.to(torch.bfloat16)(ids).logits
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()
    model = _neuron_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    grad = model.polyglu_layers()[0].routing_map.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


def test_routing_logits_are_returned_before_tau():
    model = _neuron_model().eval()
    ids = torch.randint(0, 97, (1, 7))
    out = model(ids, return_routing="logits")
    weights = model(ids, return_routing=True).routing
    for layer, logits, g in zip(model.polyglu_layers(), out.routing, weights):
        torch.testing.assert_close(torch.softmax(logits / layer.tau, -1), g)


def test_mixed_reference_accepts_per_neuron_logits():
    gate, up = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    dynamic = torch.randn(2, 3, 5, 4)
    alpha = torch.zeros(5, 4)
    out = mixed_activation_reference(gate, up, alpha, dynamic, None, torch.tensor(1.0), ("relu", "tanh", "silu", "gelu"))
    # neuron 0 alone, with its own logits
    g0 = torch.softmax(dynamic[:, :, 0], -1)
    acts = torch.stack([torch.relu(gate), torch.tanh(gate), torch.nn.functional.silu(gate),
                        torch.nn.functional.gelu(gate)], -1)[:, :, 0]
    torch.testing.assert_close(out[:, :, 0], (g0 * acts).sum(-1) * up[:, :, 0])


# --------------------------------------------------------------------------------------------
# the CLI's parameter counts, the Hugging Face export, Qwen3 upcycling


def test_info_counts_the_map(capsys):
    from polyglu.cli import main

    assert main(["info", "paper-600m", "routing_scope=neuron", "--json"]) == 0
    neuron = json.loads(capsys.readouterr().out)
    assert main(["info", "paper-600m", "--json"]) == 0
    layer = json.loads(capsys.readouterr().out)
    assert layer["parameters"]["total"] == 597_153_888
    # d_ff * K * r per layer: 4096 * 4 * 4 * 28
    assert neuron["parameters"]["routing"] - layer["parameters"]["routing"] == 4096 * 4 * 4 * 28
    assert neuron["parameters"]["total"] - layer["parameters"]["total"] == 4096 * 4 * 4 * 28
    assert main(["info", "paper-600m", "routing_rank=0"]) == 2
    assert "routing_rank must be a positive integer" in capsys.readouterr().err


def test_export_hf_and_transformers_give_the_same_logits(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from polyglu.cli import main
    from polyglu.data.tokenizer import ByteTokenizer
    from polyglu.interop.transformers import PolychromaticForCausalLM

    model = _neuron_model(vocab_size=ByteTokenizer().vocab_size, routing_rank=3).eval()
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save(tmp_path / "model" / "tokenizer")
    assert main(["export-hf", str(tmp_path / "model"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["routing_scope"] == "neuron"
    assert PolychromaticForCausalLM is not None  # registers the classes with the Auto API
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
        greedy = hf.generate(ids, max_new_tokens=6, do_sample=False)
    ours = generate(model, ids.tolist(), 6, eos_token_id=[]).tokens
    assert torch.equal(greedy[:, 9:], ours)


def test_qwen3_upcycles_into_neuron_scope(tmp_path):
    transformers = pytest.importorskip("transformers")
    from polyglu.interop.qwen3 import load_qwen3, route_to_silu

    torch.manual_seed(1)
    config = transformers.Qwen3Config(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.2)
    qwen = transformers.Qwen3ForCausalLM(config).eval()
    qwen.save_pretrained(tmp_path)
    model, info = load_qwen3(tmp_path, ffn="polyglu", routing_scope="neuron")
    assert model.config.routing_scope == "neuron" and info["silu_weight_min"] == 1.0
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - qwen(ids).logits).abs().max() <= 1e-4
    route_to_silu(model, 3.0)  # opened for training: the per-neuron maps receive gradients
    model.train()
    model(ids).logits.logsumexp(-1).mean().backward()
    layer = model.polyglu_layers()[0]
    assert layer.gate_net[2].weight.grad.abs().max() > 0
    assert layer.routing_map.grad is not None


def test_training_continues_a_layer_checkpoint_per_neuron(layer_checkpoint):
    """`polyglu train init_from=<layer model> model.routing_scope=neuron`: the same function to start from."""
    from polyglu.config import RunConfig
    from polyglu.train.setup import build_model

    config = RunConfig.load(None, [f"init_from={layer_checkpoint}", "model.routing_scope=neuron"])
    model, built_from = build_model(config)
    model.eval()
    assert built_from is config  # init_from: the run config as given
    assert model.config.routing_scope == "neuron"
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_model(layer_checkpoint)(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("compile", ["eager", True])
def test_compiled_decode_step_matches_recompute(compile):
    """The whole decode step traced with fullgraph (the per-neuron map inside): same tokens and logits."""
    import warnings

    model = _neuron_model(vocab_size=260).eval()
    full = generate(model, PROMPTS, 8, use_cache=False, return_logits=True, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would fall back silently
        compiled = generate(model, PROMPTS, 8, return_logits=True, eos_token_id=[], compile=compile)
    assert torch.equal(compiled.tokens, full.tokens)
    torch.testing.assert_close(compiled.logits, full.logits, atol=1e-4, rtol=1e-4)
