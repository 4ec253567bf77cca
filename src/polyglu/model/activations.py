"""The activations a PolyGLU neuron can mix, each defined once: its function, the derivative the fused
kernel uses when it recomputes activations in backward, and the expression torch.compile sees.

To add an activation: one `Activation` record in `ACTIVATIONS` below, its name in
`polyglu.model_config.ACTIVATION_NAMES` (the torch-free list that configs and the CLI validate against;
this module refuses to import when the two disagree), and nothing else: tests/test_activations.py
checks every record against autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from polyglu.model_config import ACTIVATION_NAMES

aten = torch.ops.aten

Elementwise = Callable[[torch.Tensor], torch.Tensor]
Backward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    """One elementwise activation in three spellings of the same math.

    - `function(z)`: the definition (torch's own op), used by the reference formulation, the GLU
      baselines and a single-activation PolyGLU (so SwiGLU parity is bit-for-bit). Calling the
      record calls it.
    - `forward(z)` / `backward(grad, z, a)`: the eager kernel's pair, `backward` returning
      grad * act'(z) given a = forward(z) (the fused kernel recomputes a in backward). `forward`
      may return z itself: callers never write into it.
    - `expr_forward` / `expr_backward`: plain expressions for torch.compile, exponentials written
      as exp2 of -z where possible (see `exp`), so that activations mixed in one compiled loop share
      one exponential.
    - `small(z)`: the function as eager ops that are fastest on a few thousand values (a decoded
      token: `polyglu.model.small_inference`), equal to it up to float rounding; None when
      that is the function itself.
    """

    name: str
    function: Elementwise
    forward: Elementwise
    backward: Backward
    expr_forward: Elementwise
    expr_backward: Backward
    small: Elementwise | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.function(z)


_LOG2E = 1.0 / math.log(2.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 2.0 * math.sqrt(2.0 / math.pi)  # gelu_tanh(z) = z * sigmoid(C * z * (1 + A z^2))
_GELU_TANH_A = 0.044715


def exp(x: torch.Tensor) -> torch.Tensor:
    """e^x as exp2: inductor's CPU backend stores to memory every reused value computed with
    exp/sigmoid/tanh; exp2 lets a whole backward stay in one loop (3x faster)."""
    return torch.exp2(x * _LOG2E)


def sigmoid_expr(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + exp(-x))


def _tanh_fast(z: torch.Tensor) -> torch.Tensor:
    # 2 sigmoid(2z) - 1: vectorised on CPU, where torch.tanh is several times slower (|error| < 2e-7);
    # not in 16-bit floats, where the subtraction would cancel the few bits there are
    if z.dtype not in (torch.float32, torch.float64):
        return torch.tanh(z)
    return torch.sigmoid(2 * z).mul_(2).sub_(1)


def _tanh_expr(z: torch.Tensor) -> torch.Tensor:
    # 2 / (1 + e^-2z) - 1 with e^-2z = (e^-z)^2: the same exp(-z) as silu's and sigmoid's sigmoid
    e = exp(-z)
    return 2 / (1 + e * e) - 1


def _gelu_tanh_slope(z: torch.Tensor, sigmoid: Elementwise) -> tuple[torch.Tensor, torch.Tensor]:
    """s = sigmoid(y), y = C z (1 + A z^2), and d(z s)/dz = s + z s (1 - s) C (1 + 3 A z^2)."""
    s = sigmoid(_GELU_TANH_C * z * (1 + _GELU_TANH_A * z * z))
    return s, s + z * s * (1 - s) * (_GELU_TANH_C * (1 + 3 * _GELU_TANH_A * z * z))


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z, approximate="tanh")


def _gelu_expr(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1 + torch.erf(z * _INV_SQRT2))


def _gelu_small(z: torch.Tensor) -> torch.Tensor:
    # torch's gelu costs ~20 us on a 1536-value row inside a decode step (~5 us in isolation); erf
    # and three multiplies cost ~8 us there, and are closer to the exact function in float32 (1e-7
    # relative error against torch's 1e-6)
    if z.dtype not in (torch.float32, torch.float64):  # three roundings in 16 bits: torch's, rounded once
        return F.gelu(z)
    half = z * 0.5
    return torch.addcmul(half, half, torch.erf(z * _INV_SQRT2))


def _gelu_expr_backward(grad: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return grad * (0.5 * (1 + torch.erf(z * _INV_SQRT2)) + z * _INV_SQRT_2PI * exp(-0.5 * z * z))


def _silu_expr_backward(grad: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    s = sigmoid_expr(z)
    return grad * s * (1 + z * (1 - s))


def _softplus_expr(z: torch.Tensor) -> torch.Tensor:
    # log(1 + e^z) = relu(z) + log(1 + e^-|z|), written with log2/exp2 (see `exp`)
    return torch.relu(z) + torch.log2(1 + exp(-z.abs())) / _LOG2E


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


_RECORDS = (
    Activation("relu", F.relu, torch.relu, lambda grad, z, a: aten.threshold_backward(grad, a, 0),
               torch.relu, lambda grad, z, a: grad * (z > 0)),
    Activation("tanh", torch.tanh, _tanh_fast, lambda grad, z, a: aten.tanh_backward(grad, a),
               _tanh_expr, lambda grad, z, a: grad * (1 - a * a)),
    Activation("silu", F.silu, F.silu, lambda grad, z, a: aten.silu_backward(grad, z),
               lambda z: z * sigmoid_expr(z), _silu_expr_backward),
    Activation("gelu", F.gelu, F.gelu, lambda grad, z, a: aten.gelu_backward(grad, z),
               _gelu_expr, _gelu_expr_backward, small=_gelu_small),
    Activation("gelu_tanh", _gelu_tanh, lambda z: z * _gelu_tanh_slope(z, torch.sigmoid)[0],
               lambda grad, z, a: grad * _gelu_tanh_slope(z, torch.sigmoid)[1],
               lambda z: z * _gelu_tanh_slope(z, sigmoid_expr)[0],
               lambda grad, z, a: grad * _gelu_tanh_slope(z, sigmoid_expr)[1]),
    Activation("identity", _identity, _identity, lambda grad, z, a: grad, _identity, lambda grad, z, a: grad),
    Activation("sigmoid", torch.sigmoid, torch.sigmoid, lambda grad, z, a: aten.sigmoid_backward(grad, a),
               sigmoid_expr, lambda grad, z, a: grad * a * (1 - a)),
    # torch's softplus is linear above 20, where sigmoid(z) rounds to 1 in float32; the kernel's
    # derivative follows the exact function
    Activation("softplus", F.softplus, F.softplus, lambda grad, z, a: grad * torch.sigmoid(z),
               _softplus_expr, lambda grad, z, a: grad * sigmoid_expr(z)),
)

# The named activations a PolyGLU neuron can mix. Order in a layer is the order the user gives.
ACTIVATIONS: dict[str, Activation] = {record.name: record for record in _RECORDS}

if tuple(ACTIVATIONS) != ACTIVATION_NAMES:
    raise ImportError(f"polyglu.model.activations defines {tuple(ACTIVATIONS)} but polyglu.model_config.ACTIVATION_NAMES "
                      f"lists {ACTIVATION_NAMES}: keep the two in step")


def get_activations(names: tuple[str, ...] | list[str]) -> list[Activation]:
    """The records for `names`, in order; an unknown name is a ValueError naming it."""
    try:
        return [ACTIVATIONS[name] for name in names]
    except KeyError as e:
        raise ValueError(f"unknown activation {e.args[0]!r} (known: {', '.join(ACTIVATIONS)})") from None
