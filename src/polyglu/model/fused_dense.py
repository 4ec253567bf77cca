"""The "dense" form of the fused mixed activation (`polyglu.model.fused`): pure functions of whole
tensors, unrolled over the K activations, which torch.compile turns into one or two loops over the
hidden units per direction ("compiled" is these cores through `compile_fn`). Traced as-is inside a
compiled model.

The routing inputs are first laid out in one of the routing forms (`_dense_layout`), then three
cores compute the forward, the gradients reduced over d_ff (gate, up, dynamic) and the gradients
reduced over tokens (alpha, and the routing map in neuron scope). Per-neuron routing given in rank
form (gate_net's r outputs per token and the (d_ff, K, r) map, routing_scope="neuron") has its own
form, "rank_units": each hidden unit's K logits are computed inside the loops from the r values
and the map, so no (tokens, d_ff, K) logit tensor is written or read either way, and the map's
gradient is a reduction over tokens beside alpha's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from polyglu.model.activations import exp, get_activations
from polyglu.model.compiler import compile_fn

_TINY = 1e-30  # a softmax denominator below this may have lost terms to float32 underflow

# the forms whose routing comes in rank form: r1 gate_net's outputs (r, B, T', 1), r2 the map (r, K, F)
RANK_FORMS = ("rank_units", "given_rank")


def compute_dtype(gate: torch.Tensor) -> torch.dtype:
    """Float32 (the routing math and the mix), or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if gate.dtype == torch.float64 else torch.float32


def unit_logits(dynamic: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """Per-neuron dynamic logits from the rank form: dynamic (B, T', r) and routing_map (F, K, r) ->
    sum_r dynamic[..., r] * routing_map[f, k, r], (B, T', F, K), a view of a (B, T', K, F) tensor (the
    layout the per-unit forms read without a copy). The same product as `polyglu.model.polyglu.neuron_logits`."""
    F_, K, r = routing_map.shape
    flat = routing_map.permute(2, 1, 0).reshape(r, K * F_)
    return torch.matmul(dynamic, flat).unflatten(-1, (K, F_)).transpose(-1, -2)


def rank_gradients(d_units: torch.Tensor, dynamic: torch.Tensor, routing_map: torch.Tensor):
    """The gradient of per-unit logits (B, T', F, K) carried back through `unit_logits`: (d dynamic
    (B, T', r), d routing_map (F, K, r)), two matrix products in the dtype of `d_units`."""
    F_, K, r = routing_map.shape
    flat = d_units.transpose(-1, -2).reshape(-1, K * F_)  # (B T', K F)
    d_dynamic = (flat @ routing_map.to(flat.dtype).permute(2, 1, 0).reshape(r, K * F_).t()).view(dynamic.shape)
    d_map = (dynamic.to(flat.dtype).reshape(-1, r).t() @ flat).view(r, K, F_).permute(2, 1, 0)
    return d_dynamic, d_map


def factored_routing_core(alpha, dynamic, noise, tau, dtype: torch.dtype):
    """Per-token soft routing weights as g_k = A_k D_k / sum_j A_j D_j: A = exp((alpha + noise) / tau - max)
    (K, B|1, 1, F), D = exp(dynamic / tau - max) (K, B, T, 1), and a lower bound of every sum (B, T):
    the sum with each A_k at its smallest over the units."""
    static = alpha.detach().to(dtype).t()[:, None, None, :]
    if noise is not None:
        static = static + noise.detach().to(dtype).permute(2, 0, 1)[:, :, None, :]
    static = static / tau.detach().to(dtype)
    a = (static - static.amax(0)).exp()
    dyn = dynamic.detach().to(dtype).permute(2, 0, 1)[..., None] / tau.detach().to(dtype)
    d = (dyn - dyn.amax(0)).exp()
    return a.contiguous(), d.contiguous(), (d * a.amin(-1, keepdim=True)).sum(0).amin()


def _dense_layout(cores, alpha, dynamic, noise, tau, hard: bool, dtype, routing_map=None):
    """The routing inputs laid out for the unrolled kernels, in one of these forms (form, r0, r1, r2, tau):

    - "given": one weight serves all positions (T' = 1): g itself, (K, B, 1, F), computed here once;
    - "factored": per-token soft weights (`factored_routing_core`), so that no exponential is taken
      per hidden unit. Not while torch.compile traces (the underflow check syncs), nor when some sum
      could underflow (extreme logits over a small tau);
    - "exact": alpha (K, 1, 1, F), dynamic (K, B, T, 1), noise (K, B, 1, F) or None: the reference's
      logits per hidden unit (hard routing, and the fallbacks above).
    Per-neuron dynamic logits (B, T', F, K) take "given_units" (T' = 1) or "exact_units", with
    dynamic laid out (K, B, T', F). Per-neuron logits in rank form (dynamic (B, T', r) and
    `routing_map` (F, K, r)) take "rank_units": alpha + noise (K, B|1, 1, F), dynamic (r, B, T', 1),
    the map (r, K, F), each unit's logits summed in the loops; with T' = 1, "given_rank": g (K, B, 1,
    F) computed here once, with dynamic and the map for the gradients. Hard routing (no routing
    gradients) expands the rank form into the per-unit forms.
    All in `dtype` and contiguous, so that compiled loops read them as vectors.
    """
    tau_t = tau.detach().to(dtype)
    if routing_map is not None:
        dynamic_r = dynamic.detach().to(dtype).permute(2, 0, 1).contiguous()[..., None]  # (r, B, T', 1)
        map_r = routing_map.detach().to(dtype).permute(2, 1, 0).contiguous()  # (r, K, F)
        if hard:
            dynamic = unit_logits(dynamic.detach().to(dtype), routing_map.detach().to(dtype))
        elif dynamic.shape[1] == 1:
            units = unit_logits(dynamic.detach().to(dtype), routing_map.detach().to(dtype))
            weights = _dense_layout(cores, alpha, units, noise, tau, hard, dtype)[1]
            return "given_rank", weights, dynamic_r, map_r, tau_t
        else:
            static = alpha.detach().to(dtype).t()[:, None, None, :]
            if noise is not None:
                static = static + noise.detach().to(dtype).permute(2, 0, 1)[:, :, None, :]
            return "rank_units", static.contiguous(), dynamic_r, map_r, tau_t
    if dynamic.dim() == 4:  # per neuron: no factorisation
        alpha_t = alpha.detach().to(dtype).t().contiguous()[:, None, None, :]
        dynamic_t = dynamic.detach().to(dtype).permute(3, 0, 1, 2)  # (K, B, T', F)
        if dynamic_t.stride(-1) != 1:  # PolyGLU lays its per-neuron logits out so that no copy is needed
            dynamic_t = dynamic_t.contiguous()
        noise_t = None if noise is None else noise.detach().to(dtype).permute(2, 0, 1).contiguous()[:, :, None, :]
        if dynamic.shape[1] == 1:
            weights = _dense_weights("exact", alpha_t, dynamic_t, noise_t, tau_t, hard)
            return "given_units", torch.stack(weights), None, None, tau_t
        return "exact_units", alpha_t, dynamic_t, noise_t, tau_t
    if dynamic.shape[1] > 1 and not hard and not torch.compiler.is_compiling():
        a, d, lowest = cores["routing"](alpha, dynamic, noise, tau, dtype)
        if bool(lowest >= _TINY):
            return "factored", a, d, None, tau_t
    alpha_t = alpha.detach().to(dtype).t().contiguous()[:, None, None, :]
    dynamic_t = dynamic.detach().to(dtype).permute(2, 0, 1).contiguous()[..., None]
    noise_t = None if noise is None else noise.detach().to(dtype).permute(2, 0, 1).contiguous()[:, :, None, :]
    if dynamic.shape[1] == 1:
        return "given", torch.stack(_dense_weights("exact", alpha_t, dynamic_t, noise_t, tau_t, hard)), None, None, tau_t
    return "exact", alpha_t, dynamic_t, noise_t, tau_t


def _rank_logits(static, dynamic_r, map_r) -> list[torch.Tensor]:
    """Each unit's K logits before tau from the rank form: static_k + sum_j dynamic_j * map_jk, (B, T', F)."""
    R, K = map_r.shape[:2]
    return [functools.reduce(torch.add, [dynamic_r[j] * map_r[j, k] for j in range(R)], static[k]) for k in range(K)]


def _dense_weights(form: str, r0, r1, r2, tau, hard: bool) -> list[torch.Tensor]:
    """g_k, k < K, each (B, T', F), from a `_dense_layout` form: softmax((alpha + dynamic + noise) / tau)
    over k, or the one-hot of its first maximum (argmax's tie rule) when `hard`."""
    K = r0.shape[0]
    if form in ("given", "given_units", "given_rank"):
        return [r0[k] for k in range(K)]
    if form == "factored":
        products = [r0[k] * r1[k] for k in range(K)]
        inverse = 1 / functools.reduce(torch.add, products)
        return [p * inverse for p in products]
    if form == "rank_units":
        logits = _rank_logits(r0, r1, r2)
    else:
        logits = [r0[k] + r1[k] for k in range(K)]  # same additions, same order as the reference
        if r2 is not None:
            logits = [logits[k] + r2[k] for k in range(K)]
    if not hard:
        logits = [x / tau for x in logits]
    top = functools.reduce(torch.maximum, logits)
    if hard:
        weights, taken = [], torch.zeros_like(top, dtype=torch.bool)
        for x in logits:
            first = (x == top) & ~taken
            taken = taken | first
            weights.append(first.to(top.dtype))
        return weights
    exps = [exp(x - top) for x in logits]
    total = functools.reduce(torch.add, exps)
    return [e / total for e in exps]


def _dense_mix(gate, form, r0, r1, r2, tau, activations, hard):
    z = gate.to(r0.dtype)
    g = _dense_weights(form, r0, r1, r2, tau, hard)
    acts = [rule.expr_forward(z) for rule in get_activations(activations)]
    m = functools.reduce(torch.add, [g[k] * a for k, a in enumerate(acts)])
    return z, g, acts, m


def dense_forward_core(gate, up, form: str, r0, r1, r2, tau, activations: tuple[str, ...], hard: bool):
    m = _dense_mix(gate, form, r0, r1, r2, tau, activations, hard)[3]
    return (m * up.to(m.dtype)).to(gate.dtype)


def _dense_logit_grads(grad, up, g, acts, m, tau) -> list[torch.Tensor]:
    """d l_k = (dh * up * g_k) * (a_k - m) / tau, per k."""
    dm = grad.to(m.dtype) * up.to(m.dtype)
    return [dm * g[k] * (a - m) / tau for k, a in enumerate(acts)]


def dense_backward_inputs_core(grad, gate, up, form: str, r0, r1, r2, tau, activations: tuple[str, ...],
                               hard: bool, dynamic_grad: bool):
    """-> (d gate, d up, d dynamic (B, T', K) or None). Reductions over d_ff only, so a compiler can
    fuse them into the loop that computes the elementwise gradients. In the rank forms d dynamic is
    (B, T', r): sum over units and k of d l_k * map_jk."""
    z, g, acts, m = _dense_mix(gate, form, r0, r1, r2, tau, activations, hard)
    dh = grad.to(z.dtype)
    dm = dh * up.to(z.dtype)
    d_gate = functools.reduce(torch.add, [rule.expr_backward(dm * g[k], z, acts[k])
                                          for k, rule in enumerate(get_activations(activations))])
    d_up = dh * m
    d_dynamic = None
    if dynamic_grad:
        shared = form.startswith("given")  # one routing weight per row: sum over positions too
        grads = _dense_logit_grads(grad, up, g, acts, m, tau)
        if form in RANK_FORMS:
            if shared:
                grads = [d.sum(1, keepdim=True) for d in grads]
            R = r2.shape[0]
            d_dynamic = torch.stack([functools.reduce(torch.add, [d * r2[j, k] for k, d in enumerate(grads)]).sum(-1)
                                     for j in range(R)], -1)  # (B, T', r)
        elif form.endswith("_units"):  # per-neuron logits: d l itself, (B, T', F, K)
            # stored (B, T', K, F), the layout PolyGLU's per-neuron logits come in (a view, no copy back)
            d_dynamic = torch.stack([d.sum(1, keepdim=True) if shared else d for d in grads], -2).transpose(-1, -2)
        else:
            dims = (1, 2) if shared else (2,)
            d_dynamic = torch.stack([d.sum(dims) for d in grads], -1)
            d_dynamic = d_dynamic[:, None] if shared else d_dynamic
    return d_gate.to(gate.dtype), d_up.to(up.dtype), d_dynamic


def dense_backward_alpha_core(grad, gate, up, form: str, r0, r1, r2, tau, activations: tuple[str, ...]):
    """-> d alpha (F, K); in the rank forms (d alpha, d routing_map (F, K, r)). A reduction over
    tokens: kept apart so that compiled, it recomputes the elementwise terms rather than writing K
    hidden-layer-sized buffers for a second pass."""
    _, g, acts, m = _dense_mix(gate, form, r0, r1, r2, tau, activations, False)
    grads = _dense_logit_grads(grad, up, g, acts, m, tau)
    if form not in RANK_FORMS:
        return torch.stack([d.sum((0, 1)) for d in grads], -1)
    # d alpha_k and d map_jk = sum over tokens of dynamic_j * d l_k, stacked as one (F, K, 1 + r) result:
    # all K (1 + r) sums in one loop over the tokens (see _COMPILE_OPTIONS)
    R = r1.shape[0]
    both = torch.stack([torch.stack([d.sum((0, 1))] + [(d * r1[j]).sum((0, 1)) for j in range(R)], -1)
                        for d in grads], 1)
    return both[..., 0], both[..., 1:]


DENSE_CORES = {"forward": dense_forward_core, "inputs": dense_backward_inputs_core,
               "alpha": dense_backward_alpha_core, "routing": factored_routing_core}


def dense_forward(cores, gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map=None):
    """-> (h, state): state = `_dense_layout`'s (form, r0, r1, r2, tau), computed once and kept for backward."""
    state = _dense_layout(cores, alpha, dynamic, noise, tau, hard, compute_dtype(gate), routing_map)
    return cores["forward"](gate, up, *state, activations, hard), state


def dense_backward(cores, grad, gate, up, state, activations, hard, routing_grads):
    """-> (d gate, d up, d alpha, d dynamic, d routing_map): the last three None without routing
    gradients, d routing_map None outside the rank forms."""
    routing_grads = routing_grads and not hard
    d_gate, d_up, d_dynamic = cores["inputs"](grad, gate, up, *state, activations, hard, routing_grads)
    if not routing_grads:
        return d_gate, d_up, None, None, None
    d_alpha = cores["alpha"](grad, gate, up, *state, activations)
    d_alpha, d_map = d_alpha if state[0] in RANK_FORMS else (d_alpha, None)
    return d_gate, d_up, d_alpha, d_dynamic, d_map


# Inductor stores a value to memory rather than recompute it when it has many readers or a big
# expression; here every value is cheap next to a trip through memory, so let all of them fuse.
# Its C++ backend puts at most cpp.max_horizontal_fusion_size (16) reductions in one loop: the rank
# forms' token reduction has K (1 + r) = 20 at rank 4, which at 16 took two loops, each recomputing
# the routing and activations (demo sizes, AVX2: 15 ms against 8 ms in one loop).
_COMPILE_OPTIONS = {"realize_reads_threshold": 64, "realize_opcount_threshold": 10_000,
                    "realize_cpu_opcount_threshold": 10_000, "realize_acc_reads_threshold": 1_000,
                    "realize_cpu_acc_reads_threshold": 1_000, "cpp.max_horizontal_fusion_size": 64}


def _has_option(config, name: str) -> bool:
    *parents, leaf = name.split(".")
    for parent in parents:
        config = getattr(config, parent, None)
    return config is not None and hasattr(config, leaf)


@functools.cache
def compiled_cores() -> dict[str, Callable]:
    import torch._inductor.config as inductor_config

    options = {k: v for k, v in _COMPILE_OPTIONS.items() if _has_option(inductor_config, k)}
    # the routing core works on (K, B, 1, F) and (K, B, T, 1) tensors, a few small ops: eager costs
    # nothing measurable per step, where compiling it cost 2-3 s on a cold cache (demo shape, 2 cores, AVX-512 and AVX2)
    return {name: fn if name in _EAGER_CORES else compile_fn(fn, options=options) for name, fn in DENSE_CORES.items()}


_EAGER_CORES = ("routing",)
