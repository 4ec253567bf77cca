"""The small-inference override of PolyGLU's mixed activation: CPU calls without autograd too small
for the fused kernels (a decode step, a short prefill), plugged in at one place.

A batch-1 decode step spends its time in per-call overhead, not arithmetic. `choose` is the one
function that decides which implementation such a call takes; `PolyGLU.forward` asks it through
`decode_hidden` (a whole decoded token) and `polyglu.model.polyglu.mixed_activation` (the mix):

- "native-decode": one decoded float32 CPU token per row with causal pooling: the pool step, the
  routing network and the mix in one native call (`polyglu.model.native`, `decode_hidden`);
- "native": a small float32 CPU call with soft, noise-free routing: the native mixed activation;
- "eager": a small call the native kernels cannot take (another activation, hard or noisy routing,
  another dtype, kernels off or unbuilt): the reference's math in the fewest plain ops;
- None: not a small inference call (gradients, a large call, a kernel chosen explicitly, a trace):
  the fused kernels (`polyglu.model.fused`) or the reference.

Each path chosen is logged once (logger "polyglu.model.small_inference", INFO); `describe(layer)`
says in a PolyGLU's repr which path its small calls take on this machine. The native kernels'
formulas are tested against `polyglu.model.activations` (tests/test_native.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from polyglu.model import fused, native
from polyglu.model.activations import get_activations
from polyglu.model.layers import global_module_hooks, plain_linear

logger = logging.getLogger(__name__)

# Inference calls (no autograd) with at most this many hidden units take a small path: plain ops or
# one native call, no kernel overhead (a decode step; a prefill of up to 42 tokens at d_ff 1536, where
# it is 3-7% faster; from ~64 tokens the blocked kernel is)
SMALL_INFERENCE_ELEMENTS = 1 << 16
# ... and up to this many take each activation's spelling for small tensors (`Activation.small`, else
# its definition): torch's tanh and GELU cost ~20 us on one decode row inside a step. Above it, the
# eager kernel's spellings (`Activation.forward`) are faster: at 8 x 1536 values torch.tanh took
# 24 us and its sigmoid spelling 10 us, erf-GELU 19 us and torch's GELU 7.5 us (one thread, warm).
SMALL_SPELLING_ELEMENTS = 1 << 12

_logged: set[str] = set()


def _needs_grad(tensors: Sequence[torch.Tensor | None]) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _native_tensors(tensors: Sequence[torch.Tensor | None], activations: tuple[str, ...], hard: bool,
                    noisy: bool) -> bool:
    """What the native kernels need of a call itself: float32 CPU tensors, soft noise-free routing and
    activations with native codes."""
    if hard or noisy or not tensors[0].is_cpu or native.activation_codes(activations) is None:
        return False
    if len(tensors) > 3 and tensors[3] is not None and tensors[3].dim() == 4:
        return False  # per-neuron logits (B, T', F, K): the kernel reads one K-vector per token
    float32 = torch.float32
    return all(t is None or t.dtype is float32 for t in tensors)


def _native_now():
    """What the native kernels need of the moment: no autocast, and kernels that load (built on first
    use); the kernels (`torch.ops.polyglu_cpu`) if so, else None."""
    return None if torch.is_autocast_enabled("cpu") else native.kernels()


def _log_path(path: str, first: torch.Tensor, activations: tuple[str, ...]) -> None:
    if path not in _logged:
        _logged.add(path)
        logger.info("polyglu: small inference calls take the %s path (first: %s, %s)", path,
                    "x".join(map(str, first.shape)), ",".join(activations))


def choose(tensors: Sequence[torch.Tensor | None], activations: tuple[str, ...], *, hard: bool, noisy: bool,
           decode: bool = False, per_neuron: bool = False) -> str | None:
    """The path of one small inference call (see the module's docstring); the first tensor is the call's
    input (gate, or for `decode` the layer's input x). `decode`: a PolyGLU layer's whole decoded
    token ("native-decode" or None: the layer then computes it step by step; `decode_hidden` asks
    the same questions with their answers about the layer kept per KV cache). `per_neuron`: the
    logits come in rank form (a routing map), which the native kernel does not read."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and _needs_grad(tensors)):
        return None
    first = tensors[0]
    if decode:
        native_ok = len(activations) > 1 and _native_tensors(tensors, activations, hard, noisy) \
            and _native_now() is not None
        path = "native-decode" if native_ok else None
    elif first.numel() > SMALL_INFERENCE_ELEMENTS or fused.chosen_kernel() is not None:
        return None
    else:
        native_ok = not per_neuron and _native_tensors(tensors, activations, hard, noisy) \
            and _native_now() is not None
        path = "native" if native_ok else "eager"
    if path is not None:
        _log_path(path, first, activations)
    return path


def describe(activations: tuple[str, ...]) -> str:
    """Which path small CPU inference calls of a layer mixing `activations` take here, without
    building anything: "native", "native (built on first use)" or "eager (why)"."""
    if native.activation_codes(activations) is None:
        missing = [a for a in activations if a not in native.NATIVE_ACTIVATIONS]
        return f"eager ({', '.join(missing)}: no native code)"
    state = native.status()
    if state == "off":
        return "eager (POLYGLU_NATIVE=off)"
    if state == "unavailable":
        return "eager (native kernels unavailable)"
    return "native" if state == "loaded" else "native (built on first use)"


def decode_hidden(layer, x: torch.Tensor, positions: torch.Tensor | None, pool_state) -> torch.Tensor | None:
    """The hidden activations of one float32 CPU token per row of `layer` (a PolyGLU with causal
    pooling) through the native kernel: the pool step (continuing `pool_state`'s running sums in
    place), the routing network and the mixed activation in one call; None where `choose`'s rules
    say no ("native-decode").

    Called once per layer and decoded token, where Python's own time shows: inside a decode step,
    its caches cold from streaming the weights, nn.Module attribute lookups (`layer.alpha`, ...) and
    `choose` took ~18 us a layer. So what the rules ask of the layer (its routing tensors, their
    dtypes, its routing mode) is answered once per KV cache (`_decode_tensors`, kept on the layer,
    keyed by the cache's running sums `pool_state.total` and the layer's training flag), and a decode
    step asks only what can change between two tokens: a trace, grad mode, autocast, the kernels.
    Within one cache the layer's tensors may change their values in place (the kernel reads them at
    every call), not be replaced by others."""
    if torch.compiler.is_compiling():
        return None
    total, training = pool_state.total, layer.training
    memo = layer.__dict__.get("_native_decode")
    if memo is None or memo[0] is not total or memo[1] is not training:
        memo = (total, training, _decode_tensors(layer, x, training))
        layer.__dict__["_native_decode"] = memo
    tensors = memo[2]
    if tensors is None or (torch.is_grad_enabled() and _needs_grad((x, *tensors))):
        return None
    kernels = _native_now()
    if kernels is None:
        return None
    keep, count = pool_state.keep, pool_state.count
    if keep is None or count is None:  # not a decode step's shared flags: derived from the positions
        if positions is None:
            return None  # the eager path says what is missing
        keep, count = (positions > 0).float(), (positions + 1).float()
    _log_path("native-decode", x, layer.activations)
    w1, b1, w2, b2, beta, alpha, tau = tensors
    return kernels.decode_hidden.default(x, layer.gate_proj(x), layer.up_proj(x), w1, b1, total, keep, count, w2, b2,
                                         beta, alpha, tau, native.activation_codes(layer.activations))


def _decode_tensors(layer, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, ...] | None:
    """(w1, b1, w2, b2, beta, alpha, tau) of a layer whose decoded tokens the native kernel can
    compute (`choose`'s rules for "native-decode", less those of the moment), else None."""
    gate_net = layer.gate_net
    if gate_net is None or layer.routing_pool != "causal" or layer.routing_map is not None:
        return None  # the kernel computes one K-vector of logits per row, not per neuron
    first, _, second = gate_net
    if not (plain_linear(first) and plain_linear(second)) or global_module_hooks():
        return None  # an adapter (PEFT's LoRA) or hooks on the routing network: its own calls, eagerly
    tensors = (first.weight, first.bias, second.weight, second.bias, layer.beta, layer.alpha, layer.tau)
    hard, noisy = not training and layer.eval_routing == "hard", training and layer.routing_noise
    if len(layer.activations) < 2 or not _native_tensors((x, *tensors), layer.activations, hard, noisy):
        return None
    return tensors


def mixed_activation(gate: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor, dynamic: torch.Tensor,
                     noise: torch.Tensor | None, tau: torch.Tensor, activations: tuple[str, ...],
                     hard: bool = False, path: str = "eager") -> torch.Tensor:
    """sum_k g_k act_k(gate) * up for a small call without autograd, by `path` ("native" or "eager").

    gate, up: (B, T, F); dynamic: (B, T', K), or (B, T', F, K) per neuron. The eager path is the reference's formulation in the
    fewest plain ops (about a dozen), no autograd.Function, no blocks and no host sync; its
    activations are the definitions in their spelling for small tensors (`Activation.small`) up to
    `SMALL_SPELLING_ELEMENTS` values, the eager kernel's (`Activation.forward`) above.
    """
    if path == "native":
        kernels = native.kernels()
        return kernels.mixed_activation.default(gate, up, alpha, dynamic, float(tau), native.activation_codes(activations))
    if torch.is_autocast_enabled(gate.device.type):  # the routing math and the mix stay in float32
        with torch.autocast(gate.device.type, enabled=False):
            return _eager(gate, up, alpha, dynamic, noise, tau, activations, hard)
    return _eager(gate, up, alpha, dynamic, noise, tau, activations, hard)


def _eager(gate, up, alpha, dynamic, noise, tau, activations: tuple[str, ...], hard: bool) -> torch.Tensor:
    dtype = torch.float64 if gate.dtype == torch.float64 else torch.float32
    K, (B, _, F_), T_ = len(activations), gate.shape, dynamic.shape[1]
    # K leading and contiguous (written through `out`, whatever alpha's layout): torch's CPU softmax
    # over a short last dimension, or over a strided one, is several times slower
    logits = torch.empty((K, B, T_, F_), dtype=dtype, device=gate.device)
    dynamic_t = _as(dynamic, dtype).permute(3, 0, 1, 2) if dynamic.dim() == 4 else _as(dynamic, dtype).permute(2, 0, 1)[..., None]
    torch.add(_as(alpha, dtype).t()[:, None, None, :], dynamic_t, out=logits)
    if noise is not None:
        logits.add_(_as(noise, dtype).permute(2, 0, 1)[:, :, None, :])
    if hard:  # the first maximum, argmax's tie rule, as the reference
        index = logits.argmax(0, keepdim=True)
        g = (torch.arange(K, device=logits.device).view(-1, 1, 1, 1) == index).to(dtype)
    else:
        g = torch.softmax(logits.div_(_as(tau, dtype)), dim=0)
    mixed = None
    one_row = gate.numel() <= SMALL_SPELLING_ELEMENTS
    for k, rule in enumerate(get_activations(activations)):  # no stacked (K, B, T, F) copy of the activations
        a = _as(((rule.small or rule.function) if one_row else rule.forward)(gate), dtype)  # gate's dtype first
        if mixed is not None:
            mixed.addcmul_(a, g[k])
        else:  # the first activation's buffer becomes the sum, unless it is gate itself (identity)
            mixed = a * g[k] if a is gate else a.mul_(g[k])
    return _as(mixed.mul_(_as(up, dtype)), gate.dtype)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without a dispatch when it already is (a decode step makes dozens of these calls)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
