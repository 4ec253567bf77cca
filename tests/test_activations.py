"""The activation registry: each record's three spellings agree with autograd and with each other."""

import pytest
import torch

from polyglu.config import ACTIVATION_NAMES, DEFAULT_ACTIVATIONS, ModelConfig
from polyglu.model.activations import ACTIVATIONS, get_activations
from polyglu.model.polyglu import PolyGLU


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_spelling_matches_the_function_and_its_autograd_derivative(name):
    z = torch.linspace(-25, 25, 2001, dtype=torch.float64)
    z = torch.cat([z, torch.randn(500, dtype=torch.float64)]).requires_grad_()
    record = ACTIVATIONS[name]
    a_ref = record(z)
    grad = torch.randn_like(z)
    (d_ref,) = torch.autograd.grad(a_ref, z, grad)
    z = z.detach()
    for forward, backward in ((record.forward, record.backward), (record.expr_forward, record.expr_backward)):
        a = forward(z)
        torch.testing.assert_close(a, a_ref.detach(), atol=1e-9, rtol=1e-9)
        # torch's softplus switches to the identity above 20; ours follows the exact function
        torch.testing.assert_close(backward(grad, z, a), d_ref, atol=1e-8, rtol=1e-8)
    if record.small is not None:  # the spelling for a decode step's few values: the same function
        torch.testing.assert_close(record.small(z), a_ref.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["tanh", "silu", "sigmoid"])
def test_float32_fast_spellings_are_close_to_torch(name):
    z = torch.linspace(-12, 12, 100_001)
    record = ACTIVATIONS[name]
    for spelling in (record.forward, record.expr_forward):
        exact = record(z)
        assert ((spelling(z) - exact).abs() / exact.abs().clamp(min=1)).max() < 3e-7  # a few float32 ulps
    assert torch.isfinite(record.expr_forward(torch.tensor([-1e4, 1e4]))).all()


@pytest.mark.parametrize("name", [name for name, record in ACTIVATIONS.items() if record.small is not None])
def test_float32_small_spellings_are_as_exact_as_torch(name):
    z = torch.linspace(-12, 12, 100_001)
    exact = ACTIVATIONS[name](z.double())

    def error(a: torch.Tensor) -> float:
        return float(((a.double() - exact).abs() / exact.abs().clamp(min=1)).max())
    assert error(ACTIVATIONS[name].small(z)) <= max(error(ACTIVATIONS[name](z)), 3e-7)


@pytest.mark.parametrize("name", [name for name, record in ACTIVATIONS.items() if record.small is not None])
def test_small_spellings_of_16_bit_values_round_once_like_torch(name):
    z = torch.linspace(-6, 6, 4001).to(torch.bfloat16)
    assert torch.equal(ACTIVATIONS[name].small(z), ACTIVATIONS[name](z))


def test_registry_is_the_config_list_and_the_default_is_the_paper_set():
    assert tuple(ACTIVATIONS) == ACTIVATION_NAMES
    assert DEFAULT_ACTIVATIONS == ("relu", "tanh", "silu", "gelu")
    assert ModelConfig().activations == DEFAULT_ACTIVATIONS == PolyGLU(8, 8).activations
    assert [a.name for a in get_activations(("gelu", "relu"))] == ["gelu", "relu"]
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        get_activations(("relu", "swish"))
