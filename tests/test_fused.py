"""The fused mixed activation against the reference formulation: values, gradients, memory."""

import warnings

import pytest
import torch

from polyglu.model import fused, fused_dense, native, small_inference
from polyglu.model.fused import MixedActivation, default_kernel, mixed_activation_fused, use_kernel
from polyglu.model.polyglu import PolyGLU, SwiGLU, mixed_activation, mixed_activation_reference, neuron_logits

# K = 1..4, every registry activation at least once
ACTIVATION_SETS = [("silu",), ("gelu_tanh", "softplus"), ("identity", "sigmoid", "tanh"),
                   ("relu", "tanh", "silu", "gelu")]
EAGER_KERNELS = ["chunked", "dense"]  # "compiled" is "dense" through torch.compile (see the slow test)


def make_inputs(B, T, F, activations, per_token, noise, dtype=torch.float32, tau=0.7, seed=0, per_neuron=False):
    """gate, up (B, T, F), alpha (F, K), dynamic (B, T', K) (per_neuron: (B, T', F, K)) with grads;
    noise (B, F, K) or None; tau."""
    K = len(activations)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    gate, up = randn(B, T, F, scale=2.0).requires_grad_(), randn(B, T, F).requires_grad_()
    alpha = randn(F, K).requires_grad_()
    dynamic = randn(B, T if per_token else 1, *((F,) if per_neuron else ()), K).requires_grad_()
    buffers = torch.float64 if dtype == torch.float64 else torch.float32  # noise and tau, as in PolyGLU
    gumbel = randn(B, F, K).to(buffers) if noise else None
    return gate, up, alpha, dynamic, gumbel, torch.tensor(tau, dtype=buffers)


def run(fn, inputs, grad_seed=1, **kwargs):
    """h and the grads of (gate, up, alpha, dynamic) for h.backward(random dh)."""
    gate, up, alpha, dynamic, noise, tau, activations, hard = inputs
    for t in (gate, up, alpha, dynamic):
        t.grad = None
    h = fn(gate, up, alpha, dynamic, noise, tau, activations, hard, **kwargs)
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(h.dtype)
    h.backward(dh)
    return h.detach(), [None if t.grad is None else t.grad.clone() for t in (gate, up, alpha, dynamic)]


def assert_matches_reference(inputs, kernel, atol=2e-5, rtol=1e-4):
    h_ref, grads_ref = run(mixed_activation_reference, inputs)
    h, grads = run(mixed_activation_fused, inputs, kernel=kernel)
    assert h.dtype == inputs[0].dtype and h.shape == inputs[0].shape
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip(("gate", "up", "alpha", "dynamic"), grads, grads_ref):
        if g_ref is None:  # hard routing: nothing flows to the routing inputs
            assert g is None, name
        else:
            torch.testing.assert_close(g, g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d {n}: {m}")


# --------------------------------------------------------------------------------------------
# fused == reference


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 positions for F = 40: several blocks per row, and rows split across blocks."""
    monkeypatch.setattr(fused, "_BLOCK_ELEMENTS", 8 * 40)


@pytest.mark.parametrize("activations", ACTIVATION_SETS, ids=lambda a: "-".join(a))
@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
@pytest.mark.parametrize("noise", [False, True], ids=["clean", "noisy"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_matches_reference_float32(kernel, hard, noise, per_token, activations, small_blocks):
    gate, up, alpha, dynamic, gumbel, tau = make_inputs(3, 21, 40, activations, per_token, noise)
    assert_matches_reference((gate, up, alpha, dynamic, gumbel, tau, activations, hard), kernel)


@pytest.mark.parametrize("activations", [ACTIVATION_SETS[1], ACTIVATION_SETS[-1]], ids=lambda a: "-".join(a))
@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
@pytest.mark.parametrize("noise", [False, True], ids=["clean", "noisy"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_per_neuron_dynamic_logits_match_reference(kernel, hard, noise, per_token, activations, small_blocks):
    """routing_scope="neuron": dynamic (B, T', F, K), its gradient per hidden unit."""
    inputs = make_inputs(3, 21, 40, activations, per_token, noise, per_neuron=True)
    assert_matches_reference((*inputs, activations, hard), kernel)


@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_per_neuron_gradcheck_float64(kernel, per_token, monkeypatch):
    monkeypatch.setattr(fused, "_BLOCK_ELEMENTS", 2 * 5)
    activations = ACTIVATION_SETS[-1]
    gate, up, alpha, dynamic, gumbel, tau = make_inputs(2, 3, 5, activations, per_token, True, torch.float64,
                                                        per_neuron=True)

    def fn(gate, up, alpha, dynamic):
        return mixed_activation_fused(gate, up, alpha, dynamic, gumbel, tau, activations, kernel=kernel)

    assert torch.autograd.gradcheck(fn, (gate, up, alpha, dynamic), eps=1e-6, atol=1e-8, rtol=1e-6)


def make_rank_inputs(B, T, F, activations, per_token, noise, rank, dtype=torch.float32, seed=0):
    """`make_inputs` with per-neuron routing in rank form: dynamic (B, T', rank) and a map (F, K, rank)."""
    gate, up, alpha, _, gumbel, tau = make_inputs(B, T, F, activations, per_token, noise, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dynamic = torch.randn(B, T if per_token else 1, rank, generator=gen, dtype=torch.float64).to(dtype)
    routing_map = (0.7 * torch.randn(F, len(activations), rank, generator=gen, dtype=torch.float64)).to(dtype)
    return gate, up, alpha, dynamic.requires_grad_(), gumbel, tau, routing_map.requires_grad_()


def run_rank(fn, inputs, hard, grad_seed=1):
    """h and the grads of (gate, up, alpha, dynamic, routing_map), `fn` taking the rank form."""
    gate, up, alpha, dynamic, noise, tau, routing_map, activations = inputs
    leaves = (gate, up, alpha, dynamic, routing_map)
    for t in leaves:
        t.grad = None
    h = fn(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map)
    h.backward(torch.randn(h.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(h.dtype))
    return h.detach(), [None if t.grad is None else t.grad.clone() for t in leaves]


def rank_reference(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map):
    """The plain autograd formulation: each neuron's logits materialised, then the reference."""
    return mixed_activation_reference(gate, up, alpha, neuron_logits(dynamic, routing_map), noise, tau, activations,
                                      hard)


def assert_rank_form_matches_reference(inputs, kernel, hard, atol=2e-5, rtol=1e-4):
    h_ref, grads_ref = run_rank(rank_reference, inputs, hard)

    def fused_rank(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map):
        return mixed_activation_fused(gate, up, alpha, dynamic, noise, tau, activations, hard, kernel,
                                      routing_map=routing_map)

    h, grads = run_rank(fused_rank, inputs, hard)
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip(("gate", "up", "alpha", "dynamic", "routing_map"), grads, grads_ref):
        if g_ref is None:  # hard routing: nothing flows to the routing inputs
            assert g is None, name
        else:
            assert g is not None and g.shape == g_ref.shape, name
            torch.testing.assert_close(g, g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d {n}: {m}")


@pytest.mark.parametrize("rank", [3, 4, 6])
@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
@pytest.mark.parametrize("noise", [False, True], ids=["clean", "noisy"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_rank_form_matches_reference(kernel, hard, noise, per_token, rank, small_blocks):
    """routing_scope="neuron" as PolyGLU hands it over: gate_net's r outputs and the (F, K, r) map, each
    unit's logits computed inside the kernel ("rank_units" / "given_rank"); h and the gradients of
    gate, up, alpha, dynamic and the map against autograd through the materialised logits."""
    activations = ACTIVATION_SETS[-1]
    inputs = (*make_rank_inputs(3, 21, 40, activations, per_token, noise, rank), activations)
    assert_rank_form_matches_reference(inputs, kernel, hard)


@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_rank_form_gradcheck_float64(kernel, per_token, monkeypatch):
    monkeypatch.setattr(fused, "_BLOCK_ELEMENTS", 2 * 5)
    activations = ACTIVATION_SETS[-1]
    gate, up, alpha, dynamic, gumbel, tau, routing_map = make_rank_inputs(2, 3, 5, activations, per_token, True, 3,
                                                                          torch.float64)

    def fn(gate, up, alpha, dynamic, routing_map):
        return mixed_activation_fused(gate, up, alpha, dynamic, gumbel, tau, activations, kernel=kernel,
                                      routing_map=routing_map)

    assert torch.autograd.gradcheck(fn, (gate, up, alpha, dynamic, routing_map), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_rank_form_takes_the_rank_layouts_and_refuses_inconsistent_maps():
    activations = ACTIVATION_SETS[-1]
    forms = []
    for per_token in (True, False):
        gate, up, alpha, dynamic, _, tau, routing_map = make_rank_inputs(2, 5, 8, activations, per_token, False, 3)
        forms.append(fused_dense._dense_layout(fused_dense.DENSE_CORES, alpha, dynamic, None, tau, False,
                                               torch.float32, routing_map)[0])
    assert forms == ["rank_units", "given_rank"]
    with pytest.raises(ValueError, match="routing_map"):
        mixed_activation_fused(gate, up, alpha, dynamic, None, tau, activations, routing_map=routing_map[:, :2])
    with pytest.raises(ValueError, match="routing_map"):  # dynamic must be the rank form's (B, T', r)
        mixed_activation_fused(gate, up, alpha, dynamic[..., :2], None, tau, activations, routing_map=routing_map)


@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
def test_blocks_spanning_several_rows(per_token, monkeypatch):
    monkeypatch.setattr(fused, "_BLOCK_ELEMENTS", 2 * 7 * 16)  # two whole rows of T = 7 per block
    inputs = make_inputs(5, 7, 16, ACTIVATION_SETS[-1], per_token, noise=True)
    assert_matches_reference((*inputs, ACTIVATION_SETS[-1], False), "chunked")


@pytest.mark.parametrize("activations", [ACTIVATION_SETS[-1], ACTIVATION_SETS[1] + ("identity", "sigmoid")],
                         ids=["default", "others"])
@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
@pytest.mark.parametrize("noise", [False, True], ids=["clean", "noisy"])
@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_gradcheck_float64(kernel, noise, per_token, activations, monkeypatch):
    monkeypatch.setattr(fused, "_BLOCK_ELEMENTS", 2 * 5)  # blocks of 2 positions
    gate, up, alpha, dynamic, gumbel, tau = make_inputs(2, 3, 5, activations, per_token, noise, torch.float64)

    def fn(gate, up, alpha, dynamic):
        return mixed_activation_fused(gate, up, alpha, dynamic, gumbel, tau, activations, kernel=kernel)

    assert torch.autograd.gradcheck(fn, (gate, up, alpha, dynamic), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_k1_routing_gradients_are_zero_like_the_reference():
    inputs = make_inputs(2, 6, 8, ("gelu",), True, noise=True)
    _, grads = run(mixed_activation_fused, (*inputs, ("gelu",), False))
    assert torch.equal(grads[2], torch.zeros_like(grads[2])) and torch.equal(grads[3], torch.zeros_like(grads[3]))
    assert_matches_reference((*inputs, ("gelu",), False), "chunked")


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_extreme_logits_fall_back_to_an_exact_softmax(monkeypatch, kernel):
    """With tau = 0.01 the factorised weights exp(alpha/tau) * exp(dynamic/tau) underflow to 0/0; the
    affected blocks must be computed exactly instead."""
    activations = ("relu", "silu")
    gate, up, alpha, dynamic, _, _ = make_inputs(2, 16, 12, activations, True, noise=False)
    with torch.no_grad():
        alpha[:, 0], alpha[:, 1] = 10.0, -10.0
        dynamic[..., 0], dynamic[..., 1] = -10.0, 10.0  # logits tie: g = (0.5, 0.5)
        dynamic[:, ::2] += torch.tensor([0.05, -0.05])  # and lean one way on even positions
    inputs = (gate, up, alpha, dynamic, None, torch.tensor(0.01), activations, False)
    h, grads = run(mixed_activation_fused, inputs, kernel=kernel)
    assert torch.isfinite(h).all() and all(torch.isfinite(g).all() for g in grads)
    assert_matches_reference(inputs, kernel, atol=1e-3, rtol=1e-3)  # routing grads carry 1/tau = 100
    monkeypatch.setattr(fused_dense, "_TINY", 0.0)  # without the fallback: 0/0
    assert torch.isnan(mixed_activation_fused(*inputs, kernel=kernel)).any()


# --------------------------------------------------------------------------------------------
# small calls without autograd (a decode step, a short prefill)


@pytest.mark.parametrize("activations", ACTIVATION_SETS)
@pytest.mark.parametrize("mode", ["soft", "hard", "noise"])
@pytest.mark.parametrize("T, per_token", [(1, False), (5, False), (5, True)])
@pytest.mark.parametrize("spelling_elements", [1 << 12, 0])  # small-tensor spellings / the eager kernel's
@pytest.mark.parametrize("per_neuron", [False, True], ids=["layer", "neuron"])
def test_small_inference_path_equals_the_reference(activations, mode, T, per_token, spelling_elements, per_neuron,
                                                   monkeypatch):
    monkeypatch.setattr(small_inference, "SMALL_SPELLING_ELEMENTS", spelling_elements)
    gate, up, alpha, dynamic, gumbel, tau = make_inputs(3, T, 40, activations, per_token, mode == "noise",
                                                        per_neuron=per_neuron)
    inputs = (gate.detach(), up.detach(), alpha.detach(), dynamic.detach(), gumbel, tau, activations, mode == "hard")
    expected = mixed_activation_reference(*inputs)
    calls, original = [], small_inference.mixed_activation
    monkeypatch.setattr(small_inference, "mixed_activation", lambda *a: calls.append(a[-1]) or original(*a))
    monkeypatch.setattr(fused.MixedActivation, "apply", None)  # the autograd.Function is not called at all
    with torch.no_grad():
        h = mixed_activation(*inputs)
    native_possible = mode == "soft" and not per_neuron and native.activation_codes(activations) is not None \
        and native.kernels()
    assert calls == ["native" if native_possible else "eager"]
    assert calls and h.dtype == gate.dtype
    torch.testing.assert_close(h, expected, atol=1e-6, rtol=1e-5)


def test_one_token_hard_routing_takes_the_first_maximum_like_the_reference():
    activations = ("relu", "tanh", "silu")
    gate, up, alpha, dynamic, _, tau = make_inputs(2, 1, 16, activations, False, False)
    alpha = torch.zeros_like(alpha.detach())  # every logit ties within a row: the first activation wins
    dynamic = torch.zeros_like(dynamic.detach())
    with torch.no_grad():
        h = small_inference.mixed_activation(gate, up, alpha, dynamic, None, tau, activations, hard=True)
        assert torch.equal(h, mixed_activation_reference(gate, up, alpha, dynamic, None, tau, activations, True))
        assert torch.equal(h, torch.relu(gate) * up)


def test_a_small_call_needing_gradients_or_a_chosen_kernel_or_a_large_one_keeps_the_kernels(monkeypatch):
    inputs = (*make_inputs(2, 1, 24, ACTIVATION_SETS[-1], False, False), ACTIVATION_SETS[-1], False)
    monkeypatch.setattr(small_inference, "mixed_activation", None)  # would fail if it were taken
    assert_matches_reference(inputs, None)  # grads enabled and required: gradients flow
    with torch.no_grad(), use_kernel("chunked"):
        h = mixed_activation(*inputs)
    torch.testing.assert_close(h, mixed_activation_reference(*inputs).detach(), atol=2e-5, rtol=1e-4)
    monkeypatch.setattr(small_inference, "SMALL_INFERENCE_ELEMENTS", 2 * 24 - 1)  # one hidden unit too many
    with torch.no_grad():
        h = mixed_activation(*inputs)
    torch.testing.assert_close(h, mixed_activation_reference(*inputs).detach(), atol=2e-5, rtol=1e-4)


def _silu_routed_block_and_swiglu(**kwargs) -> tuple[PolyGLU, SwiGLU]:
    """A PolyGLU block whose routing is fixed on SiLU, and the SwiGLU with its projections."""
    block = PolyGLU(24, 40, gate_hidden=8, **kwargs).eval()
    with torch.no_grad():
        block.alpha.zero_()
        block.alpha[:, block.activations.index("silu")] = 120.0
        block.gate_net[2].weight.zero_()
        block.gate_net[2].bias.zero_()
    swiglu = SwiGLU(24, 40)
    swiglu.load_state_dict({k: v for k, v in block.state_dict().items() if k.endswith("_proj.weight")})
    return block, swiglu


@pytest.mark.parametrize("kernels", ["eager", "native"])
def test_one_token_routing_fixed_on_silu_is_swiglu(kernels, monkeypatch):
    """Bit for bit with the eager ops; to float rounding with the native kernels (torch's own SiLU
    takes a scalar exp for the elements after its last full vector, the native kernel a vector one)."""
    if kernels == "eager":
        monkeypatch.setattr(native, "_kernels", None)
    elif native.kernels() is None:
        pytest.skip("the native CPU kernels are unavailable here")
    block, swiglu = _silu_routed_block_and_swiglu()
    x = torch.randn(5, 1, 24)
    with torch.inference_mode():
        if kernels == "eager":
            assert torch.equal(block(x), swiglu(x))
        else:
            torch.testing.assert_close(block(x), swiglu(x), rtol=1e-6, atol=1e-7)


def test_bfloat16_inputs_keep_their_dtype():
    gate, up, alpha, dynamic, gumbel, tau = make_inputs(2, 12, 16, ACTIVATION_SETS[-1], True, True, torch.bfloat16)
    inputs = (gate, up, alpha, dynamic, gumbel, tau, ACTIVATION_SETS[-1], False)
    h, grads = run(mixed_activation_fused, inputs, kernel="chunked")
    assert h.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16] * 4
    assert_matches_reference(inputs, "chunked", atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_bfloat16_autocast_keeps_routing_and_mix_in_float32(kernel):
    """Under CPU bf16 autocast: bf16 gate/up in, bf16 out, and bit for bit what the kernel computes
    without autocast, whose routing softmax and mix are float32 (autocast would otherwise run the
    chunked kernel's softmax denominator, a matmul, in bf16)."""
    activations = ACTIVATION_SETS[-1]
    gate, up, alpha, dynamic, gumbel, tau = make_inputs(2, 12, 16, activations, True, True)
    h_fp32 = mixed_activation_reference(gate, up, alpha, dynamic, gumbel, tau, activations).detach()
    gate, up = gate.detach().bfloat16().requires_grad_(), up.detach().bfloat16().requires_grad_()
    inputs = (gate, up, alpha, dynamic, gumbel, tau, activations, False)
    h_plain, grads_plain = run(mixed_activation_fused, inputs, kernel=kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, grads = run(mixed_activation_fused, inputs, kernel=kernel)
    assert h.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16] * 2 + [torch.float32] * 2
    assert torch.equal(h, h_plain) and all(torch.equal(a, b) for a, b in zip(grads, grads_plain))
    # bf16 inputs and a bf16 output: within a few bf16 ulps of the float32 computation
    torch.testing.assert_close(h.float(), h_fp32, atol=0.05, rtol=0.02)


def test_polyglu_under_bfloat16_autocast_routes_in_float32():
    torch.manual_seed(0)
    block = PolyGLU(24, 40, gate_hidden=8, mixed_impl="fused").eval()
    x = torch.randn(2, 9, 24)
    y_fp32, g_fp32 = block(x, return_routing=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = block(x, return_routing=True)
    assert y.dtype == torch.bfloat16 and g.dtype == torch.float32
    torch.testing.assert_close(g, g_fp32, atol=0.02, rtol=0)  # the routing MLP ran in bf16: logits move a little
    torch.testing.assert_close(y.float(), y_fp32, atol=0.02, rtol=0.05)


# --------------------------------------------------------------------------------------------
# inside PolyGLU


def _routed_pair(pool, **kwargs):
    torch.manual_seed(0)
    fused_block = PolyGLU(24, 40, gate_hidden=8, routing_pool=pool, mixed_impl="fused", **kwargs)
    with torch.no_grad():
        fused_block.alpha.normal_(0, 1.0)
        fused_block.beta.uniform_(0.5, 2.0)
        fused_block.tau.fill_(0.6)
    reference = PolyGLU(24, 40, gate_hidden=8, routing_pool=pool, mixed_impl="reference", **kwargs)
    reference.load_state_dict(fused_block.state_dict())
    return fused_block, reference


def _forward_backward(block, x, doc_ids=None, noise=None):
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = block(x, doc_ids, noise=noise) if noise is not None else block(x, doc_ids)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return y.detach(), x.grad, {name: p.grad for name, p in block.named_parameters()}


@pytest.mark.parametrize("pool", ["causal", "sequence", "token"])
@pytest.mark.parametrize("mode", ["train", "eval_soft", "eval_hard"])
@pytest.mark.parametrize("documents", [False, True], ids=["rows", "packed"])
def test_polyglu_fused_equals_reference(pool, mode, documents):
    fused_block, reference = _routed_pair(pool, eval_routing="hard" if mode == "eval_hard" else "soft")
    x = torch.randn(2, 11, 24)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11]) if documents else None
    noise = None
    if mode == "train":
        fused_block.train(), reference.train()
        noise = torch.empty(2, 40, 4).exponential_(generator=torch.Generator().manual_seed(2)).log_().neg_()
    else:
        fused_block.eval(), reference.eval()
    y, dx, grads = _forward_backward(fused_block, x, doc_ids, noise)
    y_ref, dx_ref, grads_ref = _forward_backward(reference, x, doc_ids, noise)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        if grads_ref[name] is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pool", ["causal", "sequence"])
def test_routing_fixed_on_silu_is_swiglu_bit_for_bit(pool):
    """The property that lets a SwiGLU checkpoint be converted: exact, not approximately equal."""
    block, swiglu = _silu_routed_block_and_swiglu(routing_pool=pool)
    x = torch.randn(3, 9, 24)
    assert torch.equal(block(x), swiglu(x))


# --------------------------------------------------------------------------------------------
# memory


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
def test_fused_saves_only_gate_up_and_routing_inputs(per_token, kernel):
    activations = ACTIVATION_SETS[-1]
    gate, up, alpha, dynamic, gumbel, tau = make_inputs(2, 64, 256, activations, per_token, noise=True)
    args = (gate, up, alpha, dynamic, gumbel, tau, activations, False)
    fused_bytes = saved_bytes(lambda: mixed_activation_fused(*args, kernel=kernel))
    reference_bytes = saved_bytes(lambda: mixed_activation_reference(*args))
    hidden_bytes = gate.numel() * gate.element_size()
    small = sum(t.numel() * t.element_size() for t in (alpha, dynamic, gumbel, tau))
    if kernel == "chunked":
        assert fused_bytes == 2 * hidden_bytes + small  # gate, up, and the routing inputs: nothing K x d_ff
    else:  # gate, up, and the routing inputs' precomputed layout: no larger than the inputs
        assert 2 * hidden_bytes < fused_bytes <= 2 * hidden_bytes + small
    assert reference_bytes > 2.5 * fused_bytes


def test_polyglu_saves_no_more_than_swiglu():
    torch.manual_seed(0)
    polyglu, swiglu = PolyGLU(64, 256), SwiGLU(64, 256)
    x = torch.randn(2, 64, 64, requires_grad=True)

    def activation_bytes(block):
        params = {p.untyped_storage().data_ptr() for p in [*block.parameters(), *block.buffers()]}
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        return sum(storages.values())

    assert activation_bytes(polyglu) <= activation_bytes(swiglu)


# --------------------------------------------------------------------------------------------
# kernel choice


def test_default_kernel_and_overrides(monkeypatch):
    gate = torch.zeros(1, 2, 4)
    monkeypatch.delenv("POLYGLU_MIXED_KERNEL", raising=False)
    monkeypatch.setenv("POLYGLU_NATIVE", "0")  # with the native kernels on, "native" (tests/test_native_training.py)
    assert default_kernel(gate) == "chunked"
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 8)  # large CPU calls compile
    assert default_kernel(gate) == "compiled"
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 32)  # a call that needs gradients: from a quarter
    assert default_kernel(gate) == "chunked"
    assert default_kernel(gate.clone().requires_grad_()) == "compiled"
    with torch.no_grad():
        assert default_kernel(gate.clone().requires_grad_()) == "chunked"
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", None)
    assert default_kernel(gate) == "chunked"
    with use_kernel("dense"):
        assert default_kernel(gate) == "dense"
    assert default_kernel(gate) == "chunked"
    monkeypatch.setenv("POLYGLU_MIXED_KERNEL", "dense")
    assert default_kernel(gate) == "dense"
    monkeypatch.setenv("POLYGLU_MIXED_KERNEL", "fast")
    with pytest.raises(ValueError, match="POLYGLU_MIXED_KERNEL.*'fast'"):
        default_kernel(gate)
    with pytest.raises(ValueError, match="kernel must be one of"):
        use_kernel("fast").__enter__()


def test_inconsistent_shapes_are_refused():
    gate, up, alpha, dynamic, _, tau = make_inputs(2, 5, 8, ("relu", "silu"), True, noise=False)
    with pytest.raises(ValueError, match=r"alpha \(8, 2\).*3 activations"):
        mixed_activation_fused(gate, up, alpha, dynamic, None, tau, ("relu", "silu", "gelu"))
    with pytest.raises(ValueError, match=r"dynamic \(2, 3, 2\)"):
        mixed_activation_fused(gate, up, alpha, dynamic[:, :3], None, tau, ("relu", "silu"))


def test_failed_compilation_falls_back_to_chunked(monkeypatch):
    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "_compiled_cores", broken)
    monkeypatch.setattr(fused, "_compile_failed", [])
    inputs = (*make_inputs(2, 5, 8, ("relu", "silu"), True, noise=False), ("relu", "silu"), False)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        h, grads = run(mixed_activation_fused, inputs, kernel="compiled")
    h_ref, grads_ref = run(mixed_activation_fused, inputs, kernel="chunked")
    assert torch.equal(h, h_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


def test_polyglu_reaches_the_fused_function(monkeypatch):
    block = PolyGLU(8, 16, gate_hidden=4, mixed_impl="fused").eval()
    seen = []
    original = MixedActivation.forward

    def spy(ctx, *args):
        seen.append(args[8])  # the kernel
        return original(ctx, *args)

    monkeypatch.setattr(MixedActivation, "forward", staticmethod(spy))
    block(torch.randn(1, 3, 8))
    assert seen == ["chunked"]


@pytest.mark.slow
@pytest.mark.parametrize("per_neuron", [False, True], ids=["layer", "neuron"])
@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
def test_compiled_kernel_matches_reference(per_token, per_neuron):
    """torch.compile of the dense kernel on CPU (needs a C++ compiler; tens of seconds)."""
    activations = ACTIVATION_SETS[-1]
    inputs = (*make_inputs(2, 33, 48, activations, per_token, noise=True, per_neuron=per_neuron), activations, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile falls back with a warning
        assert_matches_reference(inputs, "compiled")


@pytest.mark.slow
@pytest.mark.parametrize("per_token", [False, True], ids=["shared", "per_token"])
def test_compiled_rank_form_matches_reference(per_token):
    """The rank forms through torch.compile (the default for large CPU calls in neuron scope)."""
    activations = ACTIVATION_SETS[-1]
    inputs = (*make_rank_inputs(2, 33, 48, activations, per_token, True, 4), activations)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_rank_form_matches_reference(inputs, "compiled", False)


def _run_sweep(*flags):
    """tests/scripts/compiled_kernel_sweep.py in its own process under glibc's debug allocator."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "compiled_kernel_sweep.py"
    env = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
    env.pop("POLYGLU_MIXED_KERNEL", None)
    proc = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "0 failed; routing forms compiled: exact, factored" in proc.stdout, proc.stdout


def test_compiled_kernel_sweep_under_debug_allocator():
    """The inductor-compiled kernel (what CPU training uses from 2^20 hidden units) against the plain
    autograd reference through the factored <-> exact routing switch, odd sizes, strided inputs, hard
    routing; heap corruption aborts the child process. Tens of seconds of compiling on a cold cache."""
    _run_sweep()


@pytest.mark.slow
def test_compiled_kernel_full_sweep_under_debug_allocator():
    """The same with bf16 inputs, shared weights, soft evaluation and a second set of sizes."""
    _run_sweep("--full")


def _fake_cores(shift: float):
    cores = dict(fused_dense.DENSE_CORES)
    forward = cores["forward"]
    cores["forward"] = lambda *args: forward(*args) + shift
    return lambda: cores


def test_a_disagreeing_compiled_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(fused, "_compiled_cores", _fake_cores(1.0))  # a compiled kernel gone wrong
    monkeypatch.setattr(fused, "_compile_failed", [])
    monkeypatch.setattr(fused, "_checked", set())
    inputs = (*make_inputs(2, 5, 8, ("relu", "silu"), True, noise=True), ("relu", "silu"), False)
    with pytest.warns(RuntimeWarning, match=r"disagrees with the eager kernel \(forward, output 0: max error 1"):
        h, grads = run(mixed_activation_fused, inputs, kernel="compiled")
    h_ref, grads_ref = run(mixed_activation_fused, inputs, kernel="chunked")
    assert torch.equal(h, h_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    assert fused._compile_failed  # later calls go straight to the eager kernels


def test_an_agreeing_compiled_kernel_is_checked_once_per_signature(monkeypatch):
    monkeypatch.setattr(fused, "_compiled_cores", _fake_cores(0.0))
    monkeypatch.setattr(fused, "_compile_failed", [])
    monkeypatch.setattr(fused, "_checked", set())
    calls = []
    chunked = fused.KERNELS["chunked"]
    monkeypatch.setattr(fused, "chunked_forward", lambda *a: calls.append(1) or chunked(*a))
    compiled = fused._compiled_or("forward", lambda *a: fused.chunked_forward(*a))(fused_dense.dense_forward)
    monkeypatch.setitem(fused.KERNELS, "compiled", compiled)
    activations = ("relu", "silu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for seed in range(3):  # same shapes: checked on the first call only
            run(mixed_activation_fused, (*make_inputs(2, 5, 8, activations, True, noise=True, seed=seed),
                                         activations, False), kernel="compiled")
        assert len(calls) == 1
        run(mixed_activation_fused, (*make_inputs(2, 6, 8, activations, True, noise=True), activations, False),
            kernel="compiled")  # a new length: a new compiled graph, checked again
        assert len(calls) == 2
    assert {key[0] for key in fused._checked} == {"forward", "backward"}


def test_on_cuda_a_failing_kernel_is_an_error_unless_fallback_is_allowed(monkeypatch):
    monkeypatch.setattr(fused, "_compile_failed", [])
    monkeypatch.delenv("POLYGLU_KERNEL_FALLBACK", raising=False)
    with pytest.raises(RuntimeError, match="POLYGLU_KERNEL_FALLBACK=1"):
        fused._give_up("failed to compile (ImportError: no triton)", on_cuda=True)
    assert not fused._compile_failed
    monkeypatch.setenv("POLYGLU_KERNEL_FALLBACK", "1")
    with pytest.warns(RuntimeWarning, match="using the eager kernels"):
        fused._give_up("failed to compile (ImportError: no triton)", on_cuda=True)
    assert fused._compile_failed


def test_device_errors_are_never_swallowed(monkeypatch):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(fused, "_compiled_cores", broken)
    monkeypatch.setattr(fused, "_compile_failed", [])
    monkeypatch.setenv("POLYGLU_KERNEL_FALLBACK", "1")
    inputs = (*make_inputs(2, 5, 8, ("relu", "silu"), True, noise=False), ("relu", "silu"), False)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(mixed_activation_fused, inputs, kernel="compiled")
    assert not fused._compile_failed
