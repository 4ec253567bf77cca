"""The "native" mixed-activation kernel: the CPU training kernel of `polyglu.model.fused`, written by
hand in `csrc/cpu_kernels.cpp` (`mix_forward`, `mix_backward`) and built by `polyglu.model.native`.

It computes what "compiled" computes (factored per-token routing weights, the exact softmax where a
factored sum could underflow), with two differences that make it faster:

- the backward is one pass over the hidden units: d gate, d up, d dynamic (a sum over each token's
  units) and d alpha (a sum over tokens, one buffer per thread) together, where inductor needs one
  loop per reduction axis, each recomputing the K activations;
- the loops are specialised for the default activations (relu, tanh, silu, gelu), and no tensor of
  routing tables is laid out by eager ops per call.

It takes soft routing with one K-vector of dynamic logits per token or per row (layer scope), any
Gumbel noise, gate and up in float32 or bfloat16 (math in float32), activations with a native code;
other calls go to "compiled" (`applies`). Like "compiled", the first call of each signature is
checked against the eager kernel, forward and backward; a disagreement or a kernel that does not
build means one warning and "compiled" from then on.
"""

from __future__ import annotations

import warnings

import torch

from polyglu.model import native

_given_up: list[str] = []  # why the native kernel was given up, if it was
_checked: set[tuple] = set()

# the largest error against the eager kernel, relative to the largest value, that passes the check
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def applies(gate: torch.Tensor, up: torch.Tensor, dynamic: torch.Tensor, activations: tuple[str, ...], hard: bool,
            routing_map: torch.Tensor | None) -> bool:
    """Whether the native kernel takes this call (building the kernels on first use, as POLYGLU_NATIVE says)."""
    if hard or routing_map is not None or dynamic.dim() != 3 or gate.device.type != "cpu" or _given_up:
        return False
    if gate.dtype not in _TOLERANCE or up.dtype != gate.dtype or native.activation_codes(activations) is None:
        return False
    return native.kernels() is not None and hasattr(native.kernels(), "mix_forward")


def _routing(alpha: torch.Tensor, dynamic: torch.Tensor, noise: torch.Tensor | None):
    noise = None if noise is None else noise.detach().float()
    return alpha.detach().float(), dynamic.detach().float(), noise


def forward(gate, up, alpha, dynamic, noise, tau, activations: tuple[str, ...]):
    """-> (h, state): state ("native", alpha, dynamic, noise, tau) in float32, what `backward` reads."""
    alpha, dynamic, noise = _routing(alpha, dynamic, noise)
    h = native.kernels().mix_forward(gate, up, alpha, dynamic, noise, float(tau), native.activation_codes(activations))
    return h, ("native", alpha, dynamic, noise, tau)


def backward(grad, gate, up, alpha, dynamic, noise, tau, activations: tuple[str, ...], routing_grads: bool):
    """-> (d gate, d up, d alpha (F, K), d dynamic (B, T', K), None); the routing gradients None
    without `routing_grads`."""
    d_gate, d_up, d_alpha, d_dynamic = native.kernels().mix_backward(
        grad.to(gate.dtype), gate, up, alpha, dynamic, noise, float(tau), native.activation_codes(activations),
        routing_grads)
    if not routing_grads:
        return d_gate, d_up, None, None, None
    return d_gate, d_up, d_alpha, d_dynamic, None


def checked(direction: str, args: tuple, result: tuple, eager) -> tuple:
    """`result` if this signature was checked before or agrees with `eager()` now; else one warning,
    the native kernel given up for this process, and the eager result."""
    from polyglu.model.fused import _disagreement, _signature  # noqa: PLC0415 (fused imports this module)

    key = (direction, _signature(args))
    if key in _checked:
        return result
    expected = eager()
    count = 1 if direction == "forward" else len(expected)
    differs = _disagreement(result[:count], expected[:count])
    if differs is None:
        _checked.add(key)
        return result
    give_up(f"disagrees with the eager kernel ({direction}, {differs})")
    return expected


def give_up(reason: str) -> None:
    _given_up.append(reason)
    warnings.warn(f"polyglu: the native mixed-activation kernel {reason}; using the compiled kernel from now on",
                  RuntimeWarning, stacklevel=3)

