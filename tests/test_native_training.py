"""The native training kernel ("native" in polyglu.model.fused: csrc/cpu_kernels.cpp mix_forward and
mix_backward, wrapped by polyglu.model.fused_native): the reference's output and all four gradients
in float32 and bfloat16, with and without noise, shared or per-token routing, the exact fallback at
tiny tau, any thread count; taken where it applies and only there; checked once per signature and
given up, with one warning, when it disagrees."""

import warnings

import pytest
import torch

from polyglu.model import fused, fused_native, native
from polyglu.model.fused import default_kernel, mixed_activation_fused
from polyglu.model.fused_dense import _TINY, factored_routing_core
from polyglu.model.polyglu import mixed_activation_reference

DEFAULT = ("relu", "tanh", "silu", "gelu")  # the compile-time specialised loops
ALL_NATIVE = native.NATIVE_ACTIVATIONS  # the run-time loops


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.setattr(fused_native, "_given_up", [])
    monkeypatch.setattr(fused_native, "_checked", set())


def make_inputs(B, T, F, K, per_token, noisy, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(B, T, F, generator=g) * 3, torch.randn(B, T, F, generator=g)
    alpha = torch.randn(F, K, generator=g) * scale
    dynamic = torch.randn(B, T if per_token else 1, K, generator=g) * scale
    noise = torch.randn(B, F, K, generator=g) if noisy else None
    return gate, up, alpha, dynamic, noise


def reference(grad, gate, up, alpha, dynamic, noise, tau, activations):
    """Output and gradients (gate, up, alpha, dynamic) of the reference formulation in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (gate, up, alpha, dynamic)]
    h = mixed_activation_reference(*leaves, None if noise is None else noise.double(), torch.tensor(tau, dtype=torch.float64),
                                   activations)
    h.backward(grad.double())
    return [h.detach()] + [t.grad for t in leaves]


def assert_close_relative(got, expected, tolerance, what):
    scale = float(expected.abs().max()) or 1.0
    error = float((got.double() - expected).abs().max())
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} against values up to {scale:.3g}"


@pytest.mark.parametrize("activations", [DEFAULT, ALL_NATIVE, ("silu",), ("gelu", "relu")])
@pytest.mark.parametrize("B, T, F, per_token, noisy", [(2, 5, 40, True, True), (3, 4, 33, False, False),
                                                       (2, 3, 64, True, False), (1, 2, 1, False, True)])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_forward_and_backward_equal_the_reference(kernels, activations, B, T, F, per_token, noisy, tau):
    gate, up, alpha, dynamic, noise = make_inputs(B, T, F, len(activations), per_token, noisy)
    grad = torch.randn(B, T, F)
    codes = native.activation_codes(activations)
    h = kernels.mix_forward(gate, up, alpha, dynamic, noise, tau, codes)
    d_gate, d_up, d_alpha, d_dynamic = kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, tau, codes, True)
    expected = reference(grad, gate, up, alpha, dynamic, noise, tau, activations)
    for name, got, want in zip(("h", "d gate", "d up", "d alpha", "d dynamic"), (h, d_gate, d_up, d_alpha, d_dynamic),
                               expected):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        # elementwise results to float32 rounding; the sums, which cancel (float32 eager kernels err up to
        # ~1e-4 here too), to 5e-4 of their largest value
        assert_close_relative(got, want, 5e-4 if name in ("d alpha", "d dynamic") else 4e-6, name)
    without = kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, tau, codes, False)
    assert torch.equal(without[0], d_gate) and torch.equal(without[1], d_up)
    assert without[2] is None or without[2].numel() == 0


def test_tokens_whose_factored_sum_underflows_take_the_exact_softmax(kernels):
    # logits of +-40 over tau 0.02: the factored weights A_k D_k underflow for most tokens
    gate, up, alpha, dynamic, noise = make_inputs(2, 6, 48, 4, True, True, scale=40.0)
    _, _, lowest = factored_routing_core(alpha, dynamic, noise, torch.tensor(0.02), torch.float32)
    assert lowest < _TINY  # the factored form alone would divide by zero here
    grad = torch.randn(2, 6, 48)
    codes = native.activation_codes(DEFAULT)
    h = kernels.mix_forward(gate, up, alpha, dynamic, noise, 0.02, codes)
    grads = kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, 0.02, codes, True)
    expected = reference(grad, gate, up, alpha, dynamic, noise, 0.02, DEFAULT)
    for name, got, want in zip(("h", "d gate", "d up"), (h, *grads[:2]), expected):
        assert_close_relative(got, want, 4e-6, name)
    for got, want in zip(grads[2:], expected[3:]):  # nearly one-hot weights: routing gradients near 0
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_token", [True, False])
def test_bfloat16_inputs_compute_in_float32(kernels, per_token):
    gate, up, alpha, dynamic, noise = make_inputs(3, 7, 72, 4, per_token, True)
    gate, up, grad = gate.bfloat16(), up.bfloat16(), torch.randn(3, 7, 72).bfloat16()
    codes = native.activation_codes(DEFAULT)
    h = kernels.mix_forward(gate, up, alpha, dynamic, noise, 0.5, codes)
    d_gate, d_up, d_alpha, d_dynamic = kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, 0.5, codes, True)
    expected = reference(grad, gate, up, alpha, dynamic, noise, 0.5, DEFAULT)  # on the same bf16 values
    assert (h.dtype, d_gate.dtype, d_up.dtype, d_alpha.dtype) == (torch.bfloat16,) * 3 + (torch.float32,)
    for name, got, want in zip(("h", "d gate", "d up"), (h, d_gate, d_up), expected):
        assert_close_relative(got, want, 2 ** -8, name)  # one bf16 rounding of a float32 result
    assert_close_relative(d_alpha, expected[3], 1e-5, "d alpha")  # float32 sums of exact bf16 inputs
    assert_close_relative(d_dynamic, expected[4], 1e-5, "d dynamic")


@pytest.mark.parametrize("F", [64, 72, 37])  # whole vectors (AVX-512 and AVX2), a tail, a tail alone
def test_bfloat16_results_are_the_float32_results_rounded(kernels, F):
    # bf16 rows are widened and results rounded in registers. A run-time activation set computes the
    # same float32 math from bf16 and float32 inputs: its results are the float32 ones under torch's
    # round-to-nearest-even (NaN where NaN). The default set computes at bf16 grade from bf16 inputs
    # (cheaper exp and erf, ~1e-4 of the largest value): within one bf16 unit of the float32 results.
    for activations, exact in ((("silu", "gelu", "relu"), True), (DEFAULT, False)):
        gate, up, alpha, dynamic, noise = make_inputs(2, 5, F, len(activations), True, True)
        gate, up, grad = gate.bfloat16(), up.bfloat16(), torch.randn(2, 5, F).bfloat16()
        gate[0, 0, 3], up[1, 2, F - 1] = float("nan"), float("nan")
        codes = native.activation_codes(activations)
        results = [kernels.mix_forward(gate, up, alpha, dynamic, noise, 0.5, codes)]
        results += kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, 0.5, codes, False)[:2]
        wide = [kernels.mix_forward(gate.float(), up.float(), alpha, dynamic, noise, 0.5, codes)]
        wide += kernels.mix_backward(grad.float(), gate.float(), up.float(), alpha, dynamic, noise, 0.5, codes,
                                     False)[:2]
        for got, want in zip(results, wide):
            assert got.dtype == torch.bfloat16
            if exact:
                torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0, equal_nan=True)
            else:
                scale = float(want.nan_to_num().abs().max())  # erf's 2.5e-5 is absolute: near 0 it shows
                torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=2 ** -7, atol=1e-4 * scale,
                                           equal_nan=True)


def test_threads_split_the_rows_and_sum_the_alpha_gradient(kernels):
    gate, up, alpha, dynamic, noise = make_inputs(4, 64, 160, 4, True, True)
    grad = torch.randn(4, 64, 160)
    codes = native.activation_codes(DEFAULT)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, 0.7, codes, True)
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        d_gate, d_up, d_alpha, d_dynamic = results[threads]
        assert torch.equal(d_gate, results[1][0]) and torch.equal(d_up, results[1][1])  # each unit once
        assert torch.equal(d_dynamic, results[1][3])  # each token's sum on one thread
        torch.testing.assert_close(d_alpha, results[1][2], rtol=1e-4, atol=1e-5)  # partial sums per thread


def test_parallel_loops_run_on_torchs_own_threads(kernels):
    # threads of the kernels' own competed with torch's spinning OpenMP workers for the cores (a
    # 2-thread training step took 1.2x SwiGLU's); with torch's runtime found they run on its workers
    openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert kernels.threading() == ("openmp" if openmp else "torch")


def test_bad_inputs_are_refused_by_the_kernel(kernels):
    gate, up, alpha, dynamic, noise = make_inputs(2, 3, 8, 4, True, True)
    codes = native.activation_codes(DEFAULT)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.mix_forward(gate.double(), up.double(), alpha, dynamic, noise, 1.0, codes)
    with pytest.raises(RuntimeError, match="noise must be"):
        kernels.mix_forward(gate, up, alpha, dynamic, noise[:, :4], 1.0, codes)
    with pytest.raises(RuntimeError, match="dynamic must be"):
        kernels.mix_forward(gate, up, alpha, dynamic[:, :2], noise, 1.0, codes)
    with pytest.raises(RuntimeError, match="gradient must be"):
        kernels.mix_backward(gate.bfloat16(), gate, up, alpha, dynamic, noise, 1.0, codes, True)


# --------------------------------------------------------------------------------------------
# in the fused kernel


def fused_gradients(kernel, gate, up, alpha, dynamic, noise, tau, activations, hard=False):
    leaves = [t.detach().clone().requires_grad_() for t in (gate, up, alpha, dynamic)]
    h = mixed_activation_fused(*leaves, noise, torch.tensor(tau), activations, hard, kernel=kernel)
    h.backward(torch.ones_like(h))
    return [h.detach()] + [t.grad for t in leaves]


def test_the_native_kernel_trains_like_the_eager_one(kernels):
    inputs = make_inputs(2, 6, 40, 4, True, True)
    got = fused_gradients("native", *inputs, 0.6, DEFAULT)
    expected = fused_gradients("chunked", *inputs, 0.6, DEFAULT)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(fused_native._checked) == 2  # forward and backward checked once each for this signature


def test_calls_it_does_not_take_go_to_the_compiled_kernel(kernels, monkeypatch):
    taken = []

    def compiled(*args):
        taken.append(args[7])  # hard
        return fused.chunked_forward(*args)

    monkeypatch.setitem(fused.KERNELS, "compiled", compiled)
    gate, up, alpha, dynamic, noise = make_inputs(2, 4, 16, 4, True, False)
    with torch.no_grad():
        mixed_activation_fused(gate, up, alpha, dynamic, None, torch.tensor(1.0), DEFAULT, True, kernel="native")
        mixed_activation_fused(gate.double(), up.double(), alpha, dynamic, None, torch.tensor(1.0), DEFAULT,
                               kernel="native")
    assert taken == [True, False]
    assert not fused_native.applies(gate, up, dynamic, ("relu", "gelu_tanh"), False, None)
    assert not fused_native.applies(gate, up, dynamic[..., None, :].expand(2, 4, 16, 4), DEFAULT, False, None)
    assert fused_native.applies(gate, up, dynamic, DEFAULT, False, None)
    assert fused_native.applies(gate.bfloat16(), up.bfloat16(), dynamic, DEFAULT, False, None)


def test_a_disagreeing_kernel_is_given_up_with_one_warning(kernels, monkeypatch):
    real = fused_native.forward

    def wrong(*args):
        h, state = real(*args)
        return h + 1, state

    monkeypatch.setattr(fused_native, "forward", wrong)
    inputs = make_inputs(2, 4, 24, 4, True, True)
    expected = fused_gradients("chunked", *inputs, 0.8, DEFAULT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fused_gradients("native", *inputs, 0.8, DEFAULT)  # the eager result, then "compiled"'s fallback
    messages = [str(w.message) for w in caught if "native mixed-activation kernel" in str(w.message)]
    assert len(messages) == 1 and "disagrees with the eager kernel (forward" in messages[0]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert not fused_native.applies(inputs[0], inputs[1], inputs[3], DEFAULT, False, None)


def test_large_cpu_calls_take_it_unless_the_native_kernels_are_off(monkeypatch):
    monkeypatch.delenv("POLYGLU_MIXED_KERNEL", raising=False)
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 8)
    gate = torch.zeros(1, 2, 4, requires_grad=True)
    monkeypatch.delenv("POLYGLU_NATIVE", raising=False)
    assert default_kernel(gate) == "native"
    monkeypatch.setenv("POLYGLU_NATIVE", "0")
    assert default_kernel(gate) == "compiled"


def test_a_training_step_through_it_equals_the_eager_kernels(kernels, tiny_config, monkeypatch):
    from polyglu import PolychromaticLM

    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config).train()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 17))
    grads = {}
    for kernel in ("chunked", "native"):
        # the native routing network too (from 1 token)
        monkeypatch.setattr(fused_native, "POOL_MIN_TOKENS", 1 if kernel == "native" else 10 ** 9)
        model.zero_grad()
        torch.manual_seed(1)  # the same Gumbel noise
        with fused.use_kernel(kernel):
            logits = model(tokens[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["native"].keys() == grads["chunked"].keys()
    for name, g in grads["native"].items():
        torch.testing.assert_close(g, grads["chunked"][name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------
# causal pooling and the routing head


def routing_outputs(layer, x, positions, doc_ids, native_from: int, monkeypatch):
    monkeypatch.setattr(fused_native, "POOL_MIN_TOKENS", native_from)
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    dynamic, _ = layer.routing_inputs(x, positions, doc_ids, None)
    dynamic.float().backward(torch.randn(dynamic.shape, generator=torch.Generator().manual_seed(1)))
    return [dynamic.detach().float(), x.grad] + [p.grad for p in (*layer.gate_net.parameters(), layer.beta)]


@pytest.mark.parametrize("with_documents", [True, False])
def test_the_native_routing_network_equals_the_eager_ops(kernels, monkeypatch, with_documents):
    from polyglu.documents import document_positions
    from polyglu.model.polyglu import PolyGLU

    torch.manual_seed(0)
    layer = PolyGLU(24, 40, gate_hidden=8)
    with torch.no_grad():
        layer.beta.uniform_(0.5, 1.5)
        layer.gate_net[0].bias.normal_()
    x = torch.randn(3, 50, 24)
    doc_ids = (torch.arange(50) * 3 // 50).expand(3, 50) if with_documents else None
    positions = document_positions(doc_ids) if with_documents else None
    eager = routing_outputs(layer, x, positions, doc_ids, 10 ** 9, monkeypatch)
    got = routing_outputs(layer, x, positions, doc_ids, 1, monkeypatch)
    names = ["dynamic", "d x", "d w1", "d b1", "d w2", "d b2", "d beta"]
    for name, a, b in zip(names, got, eager):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_causal_pooling_equals_the_eager_mean_bit_for_bit_and_its_gradient(kernels, monkeypatch):
    from polyglu.model.polyglu import _causal_mean

    proj = torch.randn(2, 40, 8, requires_grad=True)
    positions = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, 40)
    for pos in (positions, None, positions + 2):  # a row may begin inside a document
        monkeypatch.setattr(fused_native, "POOL_MIN_TOKENS", 10 ** 9)
        expected = _causal_mean(proj, pos, None)
        grad = torch.randn_like(expected)
        (d_expected,) = torch.autograd.grad(expected, proj, grad)
        monkeypatch.setattr(fused_native, "POOL_MIN_TOKENS", 1)
        got = _causal_mean(proj, pos, None)
        (d_got,) = torch.autograd.grad(got, proj, grad)
        assert torch.equal(got, expected)  # the same double running sum, rounded per position
        torch.testing.assert_close(d_got, d_expected, rtol=1e-6, atol=1e-6)


def test_small_or_traced_routing_takes_the_eager_ops(kernels):
    proj = torch.randn(1, 8, 4)
    b1, w2, b2, beta = torch.zeros(4), torch.zeros(4, 4), torch.zeros(4), torch.ones(4)
    assert fused_native.routing_head(proj, None, b1, w2, b2, beta) is None  # 8 tokens < POOL_MIN_TOKENS
    assert fused_native.causal_mean(proj, None) is None
    big = torch.randn(2, fused_native.POOL_MIN_TOKENS, 4)
    assert fused_native.routing_head(big, None, b1, w2, b2, beta) is not None
    assert fused_native.routing_head(big.double(), None, b1, w2, b2, beta) is None
    assert fused_native.routing_head(big, None, b1.double(), w2, b2, beta) is None


# --------------------------------------------------------------------------------------------
# the gate and the routing network's first layer in one projection (fused_native.projected_mix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T", [(2, 5), (3, 1), (1, 4)])
def test_a_gate_in_the_columns_of_a_wider_buffer_gives_the_same_bits(kernels, dtype, B, T):
    F, H = 40, 8
    _, up, alpha, dynamic, noise = make_inputs(B, T, F, 4, True, True)
    g = torch.Generator().manual_seed(3)
    gp, up = (torch.randn(B, T, F + H, generator=g) * 3).to(dtype), up.to(dtype)
    gate, grad, codes = gp[..., :F], torch.randn(B, T, F, generator=g).to(dtype), native.activation_codes(DEFAULT)
    assert not gate.is_contiguous()
    assert torch.equal(kernels.mix_forward(gate, up, alpha, dynamic, noise, 0.7, codes),
                       kernels.mix_forward(gate.contiguous(), up, alpha, dynamic, noise, 0.7, codes))
    expected = kernels.mix_backward(grad, gate.contiguous(), up, alpha, dynamic, noise, 0.7, codes, True)
    d_gp = torch.full((B, T, F + H), 7.0, dtype=dtype)
    got = kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, 0.7, codes, True, d_gp[..., :F])
    assert got[0] is None  # written into d_gate_out
    assert torch.equal(d_gp[..., :F], expected[0]) and bool((d_gp[..., F:] == 7.0).all())  # the rest untouched
    for a, b in zip(got[1:], expected[1:]):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="d_gate_out must be"):
        kernels.mix_backward(grad, gate, up, alpha, dynamic, noise, 0.7, codes, True, d_gp[..., :F - 1])


def _projected_inputs(dtype=torch.float32, positions=True, noisy=True):
    B, T, F, H, K = 2, 6, 40, 8, 4
    g = torch.Generator().manual_seed(5)
    gp, up = (torch.randn(B, T, F + H, generator=g) * 2).to(dtype), torch.randn(B, T, F, generator=g).to(dtype)
    alpha = torch.randn(F, K, generator=g)
    b1, w2, b2, beta = (torch.randn(H, generator=g), torch.randn(K, H, generator=g), torch.randn(K, generator=g),
                        torch.rand(K, generator=g) + 0.5)
    pos = (torch.arange(T) % 4).expand(B, T).contiguous() if positions else None
    noise = torch.randn(B, F, K, generator=g) if noisy else None
    return [gp, up, alpha, b1, w2, b2, beta], pos, noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions, noisy", [(True, True), (False, False)])
def test_the_native_projected_mix_is_one_autograd_function(kernels, dtype, positions, noisy):
    """kernels.projected_mix (an autograd function in C++): its output without autograd equals the one
    with; each input's gradient equals the one the kernels' own calls give (mix_backward, then the
    routing head's backward, as the separate path runs them), also where only some inputs need one;
    and it refuses to build a graph of its backward (a second derivative) instead of returning a wrong one."""
    tensors, pos, noise = _projected_inputs(dtype, positions, noisy)
    codes, F = native.activation_codes(DEFAULT), tensors[1].shape[-1]
    leaves = [t.clone().requires_grad_() for t in tensors]
    h = kernels.projected_mix(*leaves, pos, noise, 0.7, codes)
    with torch.no_grad():
        assert torch.equal(kernels.projected_mix(*tensors, pos, noise, 0.7, codes), h)
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = torch.autograd.grad(h, leaves, grad)
    gp, up, alpha, b1, w2, b2, beta = tensors
    dynamic, hidden = kernels.routing_head(gp[..., F:], pos, b1, w2, b2, beta)
    d_gate, d_up, d_alpha, d_dynamic = kernels.mix_backward(grad, gp[..., :F].contiguous(), up, alpha, dynamic,
                                                            noise, 0.7, codes, True)
    d_proj, *head = kernels.routing_head_backward(d_dynamic, hidden, pos, w2, b2, beta)
    expected = [torch.cat([d_gate, d_proj.to(dtype)], -1), d_up, d_alpha, *head]
    for name, a, b in zip(["gp", "up", "alpha", "b1", "w2", "b2", "beta"], got, expected):
        assert torch.equal(a, b), name
    some = [t.clone().requires_grad_(i in (1, 4)) for i, t in enumerate(tensors)]  # up and w2 only
    d_up_only, d_w2_only = torch.autograd.grad(kernels.projected_mix(*some, pos, noise, 0.7, codes), [some[1], some[4]],
                                               grad)
    assert torch.equal(d_up_only, d_up) and torch.equal(d_w2_only, head[1])
    with pytest.raises(RuntimeError, match="differentiable once"):  # a graph of the backward: refused
        torch.autograd.grad(kernels.projected_mix(*leaves, pos, noise, 0.7, codes).float().square().sum(), leaves[1],
                            create_graph=True)


def _projected_layer(**kwargs):
    from polyglu.model.polyglu import PolyGLU

    torch.manual_seed(0)
    layer = PolyGLU(24, 48, gate_hidden=8, **kwargs).train()
    with torch.no_grad():
        layer.alpha.normal_()
        if layer.beta is not None:
            layer.beta.uniform_(0.5, 2.0)
    return layer


def _step(layer, x, doc_ids, autocast=False):
    """Output and the gradients of x and of every parameter, for one forward and backward."""
    torch.manual_seed(1)  # the same Gumbel noise
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x, doc_ids)
    grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.shape[-1])).sum(), [x, *layer.parameters()],
                                allow_unused=True)
    return [y.detach().float(), *grads]


@pytest.fixture
def small_native_calls(monkeypatch):
    """The native mix and routing head for this file's small shapes (their size thresholds lowered)."""
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 64)
    monkeypatch.setattr(fused_native, "POOL_MIN_TOKENS", 8)


class _Counter:
    def __init__(self, monkeypatch):
        self.calls, real = 0, fused_native.projected_mix

        def counted(*args):
            self.calls += 1
            return real(*args)
        monkeypatch.setattr(fused_native, "projected_mix", counted)


@pytest.mark.parametrize("autocast", [False, True])
def test_one_projection_for_gate_and_routing_trains_like_two(kernels, small_native_calls, monkeypatch, autocast):
    """After the first call of a shape (the separate projections, whose native kernels are checked
    then), a training call takes gate and gate_net's first projection from one product; output and
    every gradient agree with the separate projections (float32 to rounding; under bf16 autocast x's
    gradient is one bf16 product where it was two summed in float32)."""
    layer, counter = _projected_layer(), _Counter(monkeypatch)
    x, doc_ids = torch.randn(2, 12, 24), (torch.arange(12) // 5).expand(2, 12)
    first = _step(layer, x, doc_ids, autocast)
    assert counter.calls == 0  # the first call checks the kernels on the separate path
    got = _step(layer, x, doc_ids, autocast)
    assert counter.calls == 1
    names = ["y", "d x", *(name for name, _ in layer.named_parameters())]
    for name, a, b in zip(names, got, first):
        if autocast and name in ("y", "d x"):
            assert_close_relative(a, b.double(), 2e-2, name)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_one_projection_is_taken_only_where_it_computes_the_same(kernels, small_native_calls, monkeypatch):
    x, doc_ids = torch.randn(2, 12, 24), (torch.arange(12) // 5).expand(2, 12)
    counter = _Counter(monkeypatch)

    def taken(layer, grad=True, **kwargs):
        _step(layer, x, doc_ids)  # the first call of the shape checks the kernels, both ways
        counter.calls = 0
        with torch.set_grad_enabled(grad):
            layer(x.clone().requires_grad_(grad), doc_ids, **kwargs)
        return counter.calls > 0

    assert taken(_projected_layer())
    assert not taken(_projected_layer(), grad=False)  # no gradients: the inference paths
    assert not taken(_projected_layer(), return_routing=True)
    hard = _projected_layer(eval_routing="hard").eval()  # (its forward would compile the hard kernel)
    assert taken(_projected_layer()) and hard._projected_hidden(x.requires_grad_(), None, None) is None
    assert not taken(_projected_layer(routing_pool="sequence"))
    assert not taken(_projected_layer(routing_mode="static"))
    assert not taken(_projected_layer(routing_scope="neuron"))
    hooked = _projected_layer()
    seen = []
    hooked.gate_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not taken(hooked) and seen  # a hook on gate_proj runs: the separate projections

    class Adapter(torch.nn.Linear):  # a subclass with a forward of its own (as an adapter)
        def forward(self, x):
            return super().forward(x) * 2

    adapted = _projected_layer()
    adapter = Adapter(24, 8)
    adapter.load_state_dict(adapted.gate_net[0].state_dict())
    adapted.gate_net[0] = adapter
    assert not taken(adapted)
    with fused.use_kernel("chunked"):
        assert not taken(_projected_layer())
