"""The Triton mixed-activation kernels (polyglu.model.triton_mixed) against the reference, on CPU tensors
under TRITON_INTERPRET=1: output and all four gradients, float32 and bfloat16, per-token and per-row
routing, with and without noise, the on-device exact fallback, and the kernel choice on CUDA."""

import types

import pytest
import torch

pytest.importorskip("triton")

from polyglu.config import ACTIVATION_NAMES  # noqa: E402
from polyglu.model import fused, triton_mixed  # noqa: E402
from polyglu.model.polyglu import mixed_activation_reference  # noqa: E402

DEFAULT = ("relu", "tanh", "silu", "gelu")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(B, T, T_routing, F, K, dtype, noise=True, dynamic_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).requires_grad_()

    gate, up = rand(B, T, F, scale=2.0), rand(B, T, F)
    alpha, dynamic = rand(F, K, dt=torch.float32), rand(B, T_routing, K, scale=dynamic_scale, dt=torch.float32)
    noise_t = torch.randn(B, F, K, generator=gen) if noise else None
    grad = torch.randn(B, T, F, generator=gen).to(dtype)
    return gate, up, alpha, dynamic, noise_t, grad


def _compare(activations, dtype, T_routing, noise, tau=0.7, dynamic_scale=1.0, B=2, T=7, F=150):
    """max |triton - reference| per output (h, d gate, d up, d alpha, d dynamic), relative to each
    reference output's largest magnitude."""
    gate, up, alpha, dynamic, noise_t, grad = _inputs(B, T, T_routing if T_routing == 1 else T, F,
                                                      len(activations), dtype, noise, dynamic_scale)
    tau_t = torch.tensor(tau)
    results = {}
    for name, fn in (("triton", lambda *a: fused.mixed_activation_fused(*a, kernel="triton")),
                     ("reference", mixed_activation_reference)):
        h = fn(gate, up, alpha, dynamic, noise_t, tau_t, activations)
        grads = torch.autograd.grad(h, (gate, up, alpha, dynamic), grad)
        results[name] = [h, *grads]
    for got, want in zip(results["triton"], results["reference"]):
        assert got.dtype == want.dtype and got.shape == want.shape
    return [float((got.detach().float() - want.detach().float()).abs().max() / want.detach().float().abs().max().clamp(min=1e-12))
            for got, want in zip(results["triton"], results["reference"])]


@pytest.mark.parametrize("per_token,noise", [(True, True), (True, False), (False, True)])
def test_float32_matches_the_reference_with_every_gradient(per_token, noise):
    errors = _compare(DEFAULT, torch.float32, None if per_token else 1, noise)
    assert max(errors) < 2e-6, errors


def test_every_activation_with_a_code_matches():
    """All activations at once (K = 8, the most a launch packs): each code's function and slope."""
    assert set(triton_mixed.ACTIVATION_CODES) == set(ACTIVATION_NAMES)
    errors = _compare(ACTIVATION_NAMES, torch.float32, None, True, F=40)
    assert max(errors) < 5e-6, errors


def test_bfloat16_within_bfloat16_tolerance():
    errors = _compare(DEFAULT, torch.bfloat16, None, True)
    # outputs rounded to bf16 (8 bits): a few ulps; the routing gradients are float32 sums
    assert max(errors[:3]) < 2e-2 and max(errors[3:]) < 2e-2, errors


def test_underflowing_routing_sums_take_the_exact_softmax_on_the_device():
    """A tiny tau with extreme dynamic logits: some factored sums underflow; the kernel recomputes
    those blocks exactly (no host sync decides it) and still matches the reference."""
    tau, scale = 0.005, 60.0
    gate, up, alpha, dynamic, noise, _ = _inputs(2, 7, 7, 150, 4, torch.float32, True, scale)
    a, e, _, _ = triton_mixed._routing_tables(alpha, dynamic, noise, torch.tensor(tau))
    totals = (a[:, :, None, :] * e[..., None]).sum(0)  # (B, T, F): what the factored form divides by
    assert bool((totals < triton_mixed._TINY).any())  # the fallback is exercised
    errors = _compare(DEFAULT, torch.float32, None, True, tau=tau, dynamic_scale=scale)
    # logits / tau reach ~1e4, where a float32 ulp is ~1e-3: the softmax agrees to that, and the
    # routing gradients (divided by tau once more) to a few 1e-4 of their largest value
    assert max(errors[:3]) < 2e-6 and max(errors[3:]) < 1e-3, errors


def test_no_routing_gradients_when_routing_is_frozen():
    gate, up, alpha, dynamic, noise, grad = _inputs(1, 5, 5, 64, 4, torch.float32)
    alpha.requires_grad_(False)
    dynamic.requires_grad_(False)
    h = fused.mixed_activation_fused(gate, up, alpha, dynamic, noise, torch.tensor(1.0), DEFAULT, kernel="triton")
    d_gate, d_up = torch.autograd.grad(h, (gate, up), grad)
    ref = mixed_activation_reference(gate, up, alpha, dynamic, noise, torch.tensor(1.0), DEFAULT)
    for got, want in zip((d_gate, d_up), torch.autograd.grad(ref, (gate, up), grad)):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_hard_routing_and_cpu_without_the_interpreter_fall_back(monkeypatch):
    gate, up, alpha, dynamic, noise, _ = _inputs(1, 4, 4, 32, 4, torch.float32)
    assert not triton_mixed.supports(gate, DEFAULT, hard=True)
    with torch.no_grad():
        hard = fused.mixed_activation_fused(gate, up, alpha, dynamic, noise, torch.tensor(1.0), DEFAULT, hard=True,
                                            kernel="triton")
        want = mixed_activation_reference(gate, up, alpha, dynamic, noise, torch.tensor(1.0), DEFAULT, hard=True)
    torch.testing.assert_close(hard, want)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need the interpreter
    assert not triton_mixed.supports(gate, DEFAULT, hard=False)
    with torch.no_grad():
        form = fused.KERNELS["triton"](gate, up, alpha, dynamic, noise, torch.tensor(1.0), DEFAULT, False)[1][0]
    assert form == "chunked"


def test_cuda_training_defaults_to_the_triton_kernel(monkeypatch):
    monkeypatch.delenv("POLYGLU_MIXED_KERNEL", raising=False)
    on_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setattr(fused, "_triton_available", lambda: True)
    assert fused.default_kernel(on_cuda) == "triton"
    monkeypatch.setattr(fused, "_triton_available", lambda: False)
    assert fused.default_kernel(on_cuda) == "chunked"
    with fused.use_kernel("triton"):  # a choice like any other
        assert fused.default_kernel(torch.zeros(1, 1, 1)) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_swiglu_baseline_runs_the_same_kernel(dtype):
    """With the "triton" kernel chosen (CUDA's default), a GLU baseline computes act(gate) * up through
    PolyGLU's kernel with one activation; values and gradients as the plain ops."""
    from polyglu.model.polyglu import SwiGLU

    torch.manual_seed(0)
    block = SwiGLU(16, 40).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    with fused.use_kernel("triton"):
        assert fused.glu_kernel_applies(block.gate_proj(x), "silu")
        y = block(x)
    grads = torch.autograd.grad(y.float().square().sum(), (x, *block.parameters()))
    want = block.down_proj(torch.nn.functional.silu(block.gate_proj(x)) * block.up_proj(x))
    want_grads = torch.autograd.grad(want.float().square().sum(), (x, *block.parameters()))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for got, expected in zip((y.detach(), *grads), (want.detach(), *want_grads)):
        assert float((got.float() - expected.float()).abs().max()) <= tolerance * float(expected.float().abs().max())
    assert not fused.glu_kernel_applies(block.gate_proj(x), "silu")  # CPU default: the plain ops


def test_a_compiled_swiglu_decode_step_traces_whole():
    """The GLU's kernel check reads nothing dynamo cannot trace (fullgraph): a SwiGLU model's compiled
    decode step compiles instead of falling back to eager (which would disable the mode process-wide)."""
    import warnings

    from polyglu import PolychromaticLM, generate
    from polyglu.config import ModelConfig

    torch.manual_seed(0)
    model = PolychromaticLM(ModelConfig.from_preset("debug", ffn="swiglu")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "torch.compile of the decode step failed"
        compiled = generate(model, [[1, 2, 3]], 3, eos_token_id=[], compile="eager")
    assert compiled.tokens.tolist() == generate(model, [[1, 2, 3]], 3, eos_token_id=[]).tokens.tolist()
