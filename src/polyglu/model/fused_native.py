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
Gumbel noise, gate and up in float32 or bfloat16 (math in float32; from bf16 inputs the default
activations at bf16 grade, ~1e-4, where the eager kernel rounds each to bf16), activations with a
native code; other calls go to "compiled" (`applies`). Like "compiled", the first call of each
signature is checked against the eager kernel, forward and backward; a disagreement or a kernel that
does not build means one warning and "compiled" from then on.
"""

from __future__ import annotations

import warnings

import torch

from polyglu.model import native

MAX_ACTIVATIONS = 8  # the kernels' kMaxActivations (csrc/cpu_kernels.cpp)

_given_up: list[str] = []  # why the native kernel was given up, if it was
_checked: set[tuple] = set()

# the largest error against the eager kernel, relative to the largest value, that passes the check,
# by gate's dtype: float32 elementwise results agree to ~1e-6; the routing gradients are sums over
# thousands of terms that cancel (float32 kernels differ by up to ~3e-4 of the largest there); from
# bf16 inputs the eager kernel rounds each activation to bf16 first, this one computes in float32
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
_SUM_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2}


def applies(gate: torch.Tensor, up: torch.Tensor, dynamic: torch.Tensor, activations: tuple[str, ...], hard: bool,
            routing_map: torch.Tensor | None) -> bool:
    """Whether the native kernel takes this call (building the kernels on first use, as POLYGLU_NATIVE says)."""
    if hard or routing_map is not None or dynamic.dim() != 3 or gate.device.type != "cpu" or _given_up:
        return False
    if gate.dtype not in _TOLERANCE or up.dtype != gate.dtype or native.activation_codes(activations) is None:
        return False
    return native.kernels() is not None


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


def signature(gate, up, dynamic, noise, activations, routing_grads=None) -> tuple:
    """What makes a call a new case for the kernel's loops: shapes, dtype, noise, activations, and
    whether routing gradients are computed (a few tuples: asked on every call)."""
    return _signature(gate.shape, gate.dtype, up.dtype, dynamic.shape, noise is None, activations, routing_grads)


def _signature(gate_shape, gate_dtype, up_dtype, dynamic_shape, noiseless, activations, routing_grads=None) -> tuple:
    return gate_shape, gate_dtype, up_dtype, dynamic_shape, noiseless, activations, routing_grads


def checked(direction: str, key: tuple, result: tuple, eager) -> tuple:
    """`result` if the call's signature `key` was checked before or agrees with `eager()` now; else
    one warning, the native kernel given up for this process, and the eager result."""
    from polyglu.model.fused import _disagreement  # noqa: PLC0415 (fused imports this module)

    if (direction, *key) in _checked:
        return result
    expected = eager()
    dtype = key[1]
    tolerances = [_TOLERANCE[dtype]] * 2 + [_SUM_TOLERANCE[dtype]] * 3  # h; or d gate, d up, d alpha, d dynamic, -
    count = 1 if direction == "forward" else len(expected)
    differs = _disagreement(result[:count], expected[:count], tolerances)
    if differs is None:
        _checked.add((direction, *key))
        return result
    give_up(f"disagrees with the eager kernel ({direction}, {differs})")
    return expected


def give_up(reason: str) -> None:
    """Stop using the native kernel in this process (one warning: the calls in flight may each fail)."""
    _given_up.append(reason)
    if len(_given_up) == 1:
        warnings.warn(f"polyglu: the native mixed-activation kernel {reason}; using the compiled kernel from now on",
                      RuntimeWarning, stacklevel=3)


# Causal pooling (`polyglu.model.polyglu._causal_mean` without a cache) takes the native kernel from
# this many tokens (B * T): below it the eager ops cost little and no kernel needs building
POOL_MIN_TOKENS = 512


class _CausalMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, positions):
        ctx.save_for_backward(positions)
        ctx.dtype = proj.dtype
        return native.kernels().causal_pool(proj, positions)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        return native.kernels().causal_pool_backward(grad.float(), positions).to(ctx.dtype), None


def causal_mean(proj: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
    """The mean of proj (B, T, H) over the positions <= t of t's document, in float32, by the native
    kernel (one pass each way); None where it does not apply (the caller's eager ops then): another
    device or dtype, a trace, fewer than POOL_MIN_TOKENS tokens, kernels off or unavailable."""
    return _CausalMean.apply(proj, positions) if causal_mean_applies(proj, positions) else None


def causal_mean_applies(proj: torch.Tensor, positions: torch.Tensor | None) -> bool:
    return _pool_applies(proj.device, proj.dtype, proj.shape[0] * proj.shape[1], positions)


def _pool_applies(device: torch.device, dtype: torch.dtype, tokens: int, positions: torch.Tensor | None) -> bool:
    if device.type != "cpu" or dtype not in _TOLERANCE or torch.compiler.is_compiling():
        return False
    if tokens < POOL_MIN_TOKENS or (positions is not None and positions.dtype != torch.long):
        return False
    return native.mode() != "off" and native.kernels() is not None


class _RoutingHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, positions, b1, w2, b2, beta):
        dynamic, hidden = native.kernels().routing_head(proj, positions, b1, w2, b2, beta)
        ctx.save_for_backward(hidden, positions, w2, b2, beta)
        ctx.dtypes = proj.dtype, b1.dtype, w2.dtype, b2.dtype, beta.dtype
        return dynamic

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, positions, w2, b2, beta = ctx.saved_tensors
        grads = native.kernels().routing_head_backward(grad.float(), hidden, positions, w2, b2, beta)
        return grads[0].to(ctx.dtypes[0]), None, *(g.to(dtype) for g, dtype in zip(grads[1:], ctx.dtypes[1:]))


def routing_head(proj: torch.Tensor, positions: torch.Tensor | None, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor, beta: torch.Tensor) -> torch.Tensor | None:
    """The layer-scope routing network after its first projection proj (B, T, H): causal pooling, then
    beta * (w2 relu(pooled + b1) + b2), (B, T, K) in float32, by the native kernel (one call each
    way); None where `causal_mean` would not apply, or the parameters are not float32."""
    if any(t.dtype != torch.float32 for t in (b1, w2, b2, beta)) or w2.shape[0] > MAX_ACTIVATIONS:
        return None
    return _RoutingHead.apply(proj, positions, b1, w2, b2, beta) if causal_mean_applies(proj, positions) else None


# ---------------------------------------------------------------------------------------------
# The gate and the routing network's first layer in one projection (training on CPU).
#
# A PolyGLU layer projects x three times: gate (d_ff wide), up (d_ff) and gate_net's first layer
# (gate_hidden, 32). The last is a skinny product each way (x W1^T, and backward d_proj W1 and
# d_proj^T x) that a BLAS runs far below its speed on wide ones, and it costs x one more cast under
# autocast and its gradient one more sum. Here gate and proj come from one product with the stacked
# weight [W_gate; W1] (B, T, d_ff + gate_hidden), the mix reads the gate as the first d_ff columns
# (the kernels take evenly strided rows) and the backward writes d gate and d proj into one buffer,
# the gradient of that product: one product each way instead of two.


def projected_mix_applies(x: torch.Tensor, d_ff: int, activations: tuple[str, ...], noisy: bool, positions: torch.Tensor | None, routing_params: tuple[torch.Tensor, ...],
                          mixed_impl: str) -> bool:
    """Whether a PolyGLU call takes `projected_mix`: a CPU call that needs gradients, on which the
    native kernels would compute the mix (`fused.default_kernel` "native", `applies`) and the routing
    head (`routing_head`), and whose mix signature the native kernel already passed its first-call
    check on, forward and backward (so the first step of a shape takes the separate path, which
    checks it)."""
    from polyglu.model import fused  # noqa: PLC0415 (fused imports this module)

    if mixed_impl == "reference" or _given_up or x.dim() != 3 or not x.is_cpu or not torch.is_grad_enabled():
        return False
    B, T, _ = x.shape
    if not fused.native_chosen(B * T * d_ff, x.device, needs_grad=True):
        return False
    dtype = _compute_dtype(x)
    if native.activation_codes(activations) is None or len(activations) > MAX_ACTIVATIONS \
            or any(t.dtype != torch.float32 for t in routing_params) or not _pool_applies(x.device, dtype, B * T, positions):
        return False
    shapes = torch.Size((B, T, d_ff)), dtype, dtype, torch.Size((B, T, len(activations))), not noisy, activations
    return ("forward", *_signature(*shapes)) in _checked and ("backward", *_signature(*shapes, True)) in _checked


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes x in: the CPU autocast dtype under autocast, else x's."""
    if not torch.is_autocast_enabled("cpu") or x.dtype not in (torch.float32, torch.float64):
        return x.dtype
    get = getattr(torch, "get_autocast_dtype", None)
    return get("cpu") if get is not None else torch.get_autocast_cpu_dtype()


def projected_mix(gp: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, beta: torch.Tensor, positions: torch.Tensor | None, noise: torch.Tensor | None,
                  tau: torch.Tensor, activations: tuple[str, ...]) -> torch.Tensor:
    """The hidden activations (B, T, d_ff) in up's dtype from gp = x [W_gate; W1]^T (B, T, d_ff + H)
    and up = x W_up^T (B, T, d_ff): causal pooling of gp's last H columns, then beta * (w2 relu(pooled
    + b1) + b2) as the dynamic logits, and the mix over gp's first d_ff columns; `projected_mix_applies`
    says where it may run. Its backward gives gp's gradient in one buffer. One autograd function in
    the native library (its `ProjectedMix`), whose forward and backward call the kernels directly,
    without the Python around them (docs/performance.md, seventh session)."""
    return native.kernels().projected_mix(gp, up, alpha, b1, w2, b2, beta, positions, noise, float(tau),
                                          native.activation_codes(activations))
