"""The fused mixed activation: h = sum_k g_k * act_k(gate) * up, at a SwiGLU's memory cost.

The plain formulation (`mixed_activation_reference` in polyglu.py) lets autograd keep the K
activation outputs (and, with per-token routing, the K routing weights) of every hidden unit for
the backward pass. Here backward keeps only what a SwiGLU keeps anyway, gate and up, plus the small
routing inputs (alpha, dynamic, noise, tau), and recomputes activations, weights and mix.

With l_k = alpha_k + dynamic_k + noise_k, g = softmax(l / tau) over k and m = sum_k g_k a_k(gate):

    h          = m * up
    d up       = dh * m
    d gate     = sum_k (dh * up * g_k) * a_k'(gate)
    d l_k      = (dh * up * g_k) * (a_k - m) / tau          (softmax backward)
    d alpha    = d l summed over tokens;  d dynamic = d l summed over d_ff (and positions if T' = 1)

Per-neuron dynamic logits (routing_scope="neuron": dynamic (B, T', F, K)) take the "exact" forms
("given_units" / "exact_units"): no factorisation, one exponential per hidden unit and activation,
and d dynamic is d l itself (summed over positions if T' = 1), not summed over d_ff. PolyGLU hands
them over in rank form instead (dynamic (B, T', r), `routing_map` (F, K, r), dynamic_k = sum_r
dynamic_r map_kr): the dense kernels compute each unit's logits in their loops ("rank_units",
"given_rank"), d dynamic_r = sum over d_ff and k of d l_k map_kr and d map_kr = sum over tokens of
dynamic_r d l_k; "chunked" expands the product per call and reduces its gradient with two matmuls.

Kernels (same math, chosen by `default_kernel`):
- "chunked": eager torch ops over blocks of tokens small enough to stay in cache. Per-token routing
  weights factorise, exp(l/tau) = exp((alpha + noise)/tau) * exp(dynamic/tau), so no exponential
  is taken per hidden unit. No compiler, no warm-up: small calls with autograd (tests) and the fallback.
- "dense" (`polyglu.model.fused_dense`, with the routing forms): pure functions of whole tensors,
  unrolled over k so that torch.compile turns each direction into one or two loops over the hidden
  units. Traced as-is inside a compiled model.
- "compiled": "dense" compiled on its own (Triton on CUDA, C++ on CPU): large CPU calls the
  "native" kernel does not take (or with POLYGLU_NATIVE=0). Compiling takes seconds once per
  process (inductor caches on disk, keyed by the CPU instruction set through
  `polyglu.model.compiler`). The first call of each signature (shapes,
  dtypes, routing form) is checked against the eager kernel on the same inputs, forward and
  backward; if compiling fails or the results disagree, one warning and "chunked" from then on (on
  CUDA an error unless POLYGLU_KERNEL_FALLBACK=1; CUDA errors are never swallowed).
- "native": a hand-written CPU kernel (`polyglu.model.fused_native`, C++ in csrc/cpu_kernels.cpp):
  the same math as "compiled" for soft layer-scope routing in float32 or bf16, its backward one pass
  (both reductions); no compile per shape, one library build. The default for large CPU calls;
  calls it does not take go to "compiled", and like it, it is checked against the eager kernel on
  each signature's first call.
- "triton": two hand-written Triton kernels (`polyglu.model.triton_mixed`): factored routing with an
  on-device exact fallback, one backward pass with the alpha gradient folded in. The default on
  CUDA when triton is installed; calls it does not cover (hard routing, per-neuron logits, no CUDA
  tensor and no TRITON_INTERPRET) take "compiled" on CUDA, "chunked" elsewhere.
Choose explicitly with `use_kernel(...)` or the environment variable POLYGLU_MIXED_KERNEL.
Small calls without autograd (a decode step) never come here: `polyglu.model.small_inference`
takes them (`PolyGLU` asks it first).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

from polyglu.model import fused_dense, fused_native, native, triton_mixed
from polyglu.model.activations import get_activations
from polyglu.model.fused_dense import (
    DENSE_CORES,
    compute_dtype,
    dense_backward,
    dense_forward,
    rank_gradients,
    unit_logits,
)
from polyglu.model.fused_dense import compiled_cores as _compiled_cores

_compile_failed: list[str] = []  # why the compiled kernel was given up, if it was: later calls go to the eager kernels
_checked: set[tuple] = set()  # signatures (direction, form, shapes, dtypes, flags) whose compiled result was checked

# the compiled kernel's largest error against the eager kernel, relative to the largest value, that
# passes the once-per-signature check (float32 agrees to ~1e-6; bf16 outputs round to 2^-8)
_CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
_CHECK_TOLERANCE_16BIT = 3e-2


def fallback_allowed() -> bool:
    """On CUDA a compiled kernel that fails or disagrees is an error unless POLYGLU_KERNEL_FALLBACK=1
    (the eager kernels are many times slower there); on CPU it always falls back, with one warning."""
    return os.environ.get("POLYGLU_KERNEL_FALLBACK", "") in ("1", "true", "yes")


def _signature(value) -> object:
    """What inductor specialises a compiled graph on: tensors by shape, dtype and device, the rest by value."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.device.type
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value if isinstance(value, (str, bool, int, float, type(None))) else type(value).__name__


def _disagreement(got, expected, tolerances=None) -> str | None:
    """None when every tensor of `got` matches `expected` (same NaN/inf pattern, small relative error:
    `tolerances[i]`, else by the output's dtype); else what differs, for the one-line warning."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if a is None or b is None:
            if (a is None) != (b is None):
                return f"output {i} missing"
            continue
        a, b = a.detach().double(), b.detach().double()
        if not torch.equal(a.isfinite(), b.isfinite()):
            return f"output {i}: {int((~a.isfinite()).sum())} non-finite values where the reference has " \
                   f"{int((~b.isfinite()).sum())}"
        finite = b.isfinite()
        scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
        error = float((a - b)[finite].abs().max()) if bool(finite.any()) else 0.0
        tolerance = tolerances[i] if tolerances else _CHECK_TOLERANCE.get(got[i].dtype, _CHECK_TOLERANCE_16BIT)
        if error > tolerance * max(scale, 1e-6):
            return f"output {i}: max error {error:.3g} (values up to {scale:.3g})"
    return None


def _give_up(reason: str, on_cuda: bool, error: BaseException | None = None) -> None:
    message = f"polyglu: the compiled mixed-activation kernel {reason}"
    if on_cuda and not fallback_allowed():
        raise RuntimeError(f"{message}; set POLYGLU_KERNEL_FALLBACK=1 to continue on the eager kernels "
                           "(many times slower), or POLYGLU_MIXED_KERNEL=chunked") from error
    _compile_failed.append(reason)
    warnings.warn(f"{message}; using the eager kernels from now on", RuntimeWarning, stacklevel=3)


def _is_device_error(e: BaseException) -> bool:
    """A CUDA error leaves the device unusable: never swallowed by a fallback."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(e, accelerator_error)) or "CUDA error" in str(e)


def _compiled_or(direction: str, eager: Callable) -> Callable:
    """Runs `dense_fn(cores, ...)` with the compiled cores. The first call of each signature (shapes,
    dtypes, routing form and flags: what makes inductor compile a new graph) is checked against
    `eager(...)` on the same inputs; if compiling fails or the results disagree, one warning and
    `eager` from then on (on CUDA an error, unless `fallback_allowed()`)."""
    def wrap(dense_fn: Callable) -> Callable:
        def run(*args):
            if not _compile_failed:
                on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
                try:
                    result = dense_fn(_compiled_cores(), *args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # no C++ compiler / Triton: the eager kernel computes the same
                    if _is_device_error(e):
                        raise
                    first_line = (str(e).strip().splitlines() or [""])[0][:200]
                    _give_up(f"failed to compile ({type(e).__name__}: {first_line})", on_cuda, e)
                else:
                    key = (direction, _signature(args), result[1][0] if direction == "forward" else None)
                    if key in _checked:
                        return result
                    expected = eager(*args)
                    got_tensors = result[:1] if direction == "forward" else result
                    expected_tensors = expected[:1] if direction == "forward" else expected
                    differs = _disagreement(got_tensors, expected_tensors)
                    if differs is None:
                        _checked.add(key)
                        return result
                    _give_up(f"disagrees with the eager kernel ({direction}, {differs})", on_cuda)
                    return expected
            return eager(*args)

        return run

    return wrap

@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# "chunked": eager ops over blocks of tokens


_BLOCK_ELEMENTS = 1 << 18  # hidden units per block: 1 MiB per float32 (block, d_ff) tensor


def _blocks(B: int, T: int, F: int) -> Iterator[tuple[slice, slice]]:
    """(rows, positions) slices covering (B, T) in blocks of about _BLOCK_ELEMENTS hidden units."""
    per_block = max(1, _BLOCK_ELEMENTS // F)
    if T >= per_block:
        for b in range(B):
            for t in range(0, T, per_block):
                yield slice(b, b + 1), slice(t, min(t + per_block, T))
    else:
        rows = max(1, per_block // T)
        for b in range(0, B, rows):
            yield slice(b, min(b + rows, B)), slice(0, T)


class _Routing:
    """Routing weights for blocks of tokens, as (W, S): g = W / S, W laid out (K, b, t, F) in `dtype`
    (t = 1 when one weight serves all positions), S (b, t, F) or None when W is normalised.

    Shared weights (T' = 1) are computed once per row. Per-token soft weights use the factorisation
    W_k = A_k D_k, A = exp((alpha + noise)/tau - max) per (row, unit), D = exp(dynamic/tau - max)
    per token, S = sum_k W_k (a matmul); a block whose S could have underflowed (extreme logits over
    a small tau) falls back to an exact softmax. Per-neuron dynamic logits (B, T', F, K) are not
    factorised: every block takes the exact softmax.
    """

    def __init__(self, alpha, dynamic, noise, tau, hard: bool, dtype: torch.dtype) -> None:
        self.K = alpha.shape[1]
        self.hard = hard
        self.tau = float(tau)
        self.per_unit = dynamic.dim() == 4
        self.alpha = alpha.detach().to(dtype).t()[:, None, None, :]  # (K, 1, 1, F)
        if self.per_unit:
            self.dynamic = dynamic.detach().to(dtype).permute(3, 0, 1, 2)  # (K, B, T', F)
        else:
            self.dynamic = dynamic.detach().to(dtype).permute(2, 0, 1)[..., None]  # (K, B, T', 1)
        self.noise = None if noise is None else noise.detach().to(dtype).permute(2, 0, 1)[:, :, None, :]  # (K, B, 1, F)
        self.shared = dynamic.shape[1] == 1
        self.exact = hard or self.per_unit
        if self.shared:
            self.weights_all = self._exact(slice(None), slice(None))  # (K, B, 1, F)
        elif not self.exact:
            static = self.alpha[:, :, 0] if self.noise is None else self.alpha[:, :, 0] + self.noise[:, :, 0]
            static = static / self.tau  # (K, B|1, F)
            self.a = (static - static.amax(0)).exp_()
            dyn = self.dynamic[..., 0] / self.tau  # (K, B, T)
            self.d = (dyn - dyn.amax(0)).exp_()
            self.a_rows = self.a.permute(1, 0, 2)  # (B|1, K, F) for the matmul S = D @ A
            self.d_rows = self.d.permute(1, 2, 0)  # (B, T, K)
            # a lower bound of every S: when it is safe, no block needs checking
            bound = (self.d * self.a.amin(-1)[..., None]).sum(0)
            self.checked = bool(bound.min() < fused_dense._TINY)

    def _exact(self, rows: slice, positions: slice) -> torch.Tensor:
        # the reference's additions in the reference's order, so argmax ties match
        logits = self.alpha + self.dynamic[:, rows, positions]
        if self.noise is not None:
            logits = logits + self.noise[:, rows]
        if self.hard:
            index = logits.argmax(0, keepdim=True)
            return (torch.arange(self.K, device=logits.device).view(-1, 1, 1, 1) == index).to(logits.dtype)
        return torch.softmax(logits / self.tau, dim=0)

    def __call__(self, rows: slice, positions: slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.K == 1:
            return None, None  # the only activation has weight 1
        if self.shared:
            return self.weights_all[:, rows], None
        if self.exact:
            return self._exact(rows, positions), None
        a_rows = self.a_rows[rows] if self.a_rows.shape[0] > 1 else self.a_rows
        total = torch.matmul(self.d_rows[rows, positions], a_rows)  # (b, t, F)
        if self.checked and bool(total.amin() < fused_dense._TINY):
            return self._exact(rows, positions), None
        a = self.a[:, rows] if self.a.shape[1] > 1 else self.a
        return self.d[:, rows, positions, None] * a[:, :, None, :], total  # (K, b, t, F)


def _chunk_mix(acts: list[torch.Tensor], weights: torch.Tensor | None, total: torch.Tensor | None) -> torch.Tensor:
    """m = sum_k g_k a_k for one block (a new tensor unless K == 1)."""
    if weights is None:
        return acts[0]
    m = acts[0] * weights[0]
    for k in range(1, len(acts)):
        m.addcmul_(acts[k], weights[k])
    return m.div_(total) if total is not None else m


def chunked_forward(gate, up, alpha, dynamic, noise, tau, activations: tuple[str, ...], hard: bool,
                    routing_map=None):
    """Per-neuron logits in rank form (`routing_map` given) are expanded to per-unit logits first."""
    rules = get_activations(activations)
    dtype = compute_dtype(gate)
    units = dynamic if routing_map is None else unit_logits(dynamic.detach().to(dtype), routing_map.detach().to(dtype))
    routing = _Routing(alpha, units, noise, tau, hard, dtype)
    out = torch.empty_like(gate)
    for rows, positions in _blocks(*gate.shape):
        z = gate[rows, positions]
        weights, total = routing(rows, positions)
        m = None
        for k, rule in enumerate(rules):  # one activation alive at a time
            a = rule.forward(z).to(dtype)  # in gate's dtype first, as the reference (and SwiGLU) do
            if weights is None:
                m = a
            elif m is None:
                m = a * weights[k]
            else:
                m.addcmul_(a, weights[k])
        if total is not None:
            m.div_(total)
        torch.mul(m, up[rows, positions], out=out[rows, positions])
    return out, ("chunked", alpha, dynamic, noise, tau, routing_map)


def chunked_backward(grad, gate, up, alpha, dynamic, noise, tau, routing_map, activations: tuple[str, ...],
                     hard: bool, routing_grads: bool):
    """-> (d gate, d up, d alpha, d dynamic, d routing_map); routing gradients None when not asked
    (or hard), d routing_map None without a map."""
    if routing_map is not None:
        return _chunked_rank_backward(grad, gate, up, alpha, dynamic, noise, tau, routing_map, activations, hard,
                                      routing_grads)
    rules = get_activations(activations)
    K = len(rules)
    dtype = compute_dtype(gate)
    routing = _Routing(alpha, dynamic, noise, tau, hard, dtype)
    routing_grads = routing_grads and not hard
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    B, T, F = gate.shape
    d_alpha = torch.zeros(K, F, device=gate.device, dtype=dtype) if routing_grads else None
    d_dynamic = None
    if routing_grads:  # (K, B, T') or, per neuron, (K, B, T', F)
        d_dynamic = torch.zeros(K, *dynamic.shape[:-1], device=gate.device, dtype=dtype)
    for rows, positions in _blocks(B, T, F):
        z = gate[rows, positions]
        acts = [rule.forward(z).to(dtype) for rule in rules]
        z = z.to(dtype)
        dh = grad[rows, positions].to(dtype)
        weights, total = routing(rows, positions)
        m = _chunk_mix(acts, weights, total)
        torch.mul(dh, m, out=d_up[rows, positions])
        dm = dh * up[rows, positions]
        if total is not None:
            dm.div_(total)  # so that dm * W_k = dh * up * g_k
        r = torch.empty((K, *m.shape), device=m.device, dtype=dtype) if routing_grads else None  # d l_k * tau
        dz = None
        for k, rule in enumerate(rules):
            dm_g = dm if weights is None else dm * weights[k]
            term = rule.backward(dm_g, z, acts[k])
            if dz is None:
                dz = term
            elif k == K - 1:
                torch.add(dz, term, out=d_gate[rows, positions])
            else:
                dz.add_(term)
            if r is not None:
                torch.sub(acts[k], m, out=r[k]).mul_(dm_g)
        if K == 1:
            d_gate[rows, positions] = dz
        if r is not None:
            if routing.shared:
                per_unit = r.sum(2)  # (K, b, F)
                d_alpha += per_unit.sum(1)
                d_dynamic[:, rows, 0] += per_unit if routing.per_unit else per_unit.sum(-1)
            else:
                d_alpha += r.sum((1, 2))
                d_dynamic[:, rows, positions] = r if routing.per_unit else r.sum(-1)
    if routing_grads:
        d_alpha = d_alpha.div_(routing.tau).t().to(alpha.dtype)
        d_dynamic = d_dynamic.div_(routing.tau).movedim(0, -1).to(dynamic.dtype)
    return d_gate, d_up, d_alpha, d_dynamic, None


def _chunked_rank_backward(grad, gate, up, alpha, dynamic, noise, tau, routing_map, activations, hard,
                           routing_grads):
    """`chunked_backward` for per-neuron logits in rank form: through the expanded per-unit logits, their
    gradient reduced to dynamic's and the map's (`rank_gradients`)."""
    dtype = compute_dtype(gate)
    units = unit_logits(dynamic.detach().to(dtype), routing_map.detach().to(dtype))
    d_gate, d_up, d_alpha, d_units, _ = chunked_backward(grad, gate, up, alpha, units, noise, tau, None,
                                                         activations, hard, routing_grads)
    if d_units is None:
        return d_gate, d_up, d_alpha, None, None
    d_dynamic, d_map = rank_gradients(d_units, dynamic.detach(), routing_map.detach())
    return d_gate, d_up, d_alpha, d_dynamic.to(dynamic.dtype), d_map.to(routing_map.dtype)


# ---------------------------------------------------------------------------------------------
# autograd and kernel choice


# each kernel's forward(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map) -> (h, state);
# `state` (form, t0, t1, t2, tau, ...) is what backward needs besides gate and up, and says which backward runs
KERNELS: dict[str, Callable] = {
    "chunked": chunked_forward,
    "dense": functools.partial(dense_forward, DENSE_CORES),
    "compiled": _compiled_or("forward", chunked_forward)(dense_forward),
}
_compiled_dense_backward = _compiled_or("backward", functools.partial(dense_backward, DENSE_CORES))(dense_backward)


def _triton_forward(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map=None):
    """The Triton kernels (`triton_mixed`) where they apply (one K-vector of dynamic logits per token),
    else "compiled" on CUDA, "chunked" elsewhere."""
    if routing_map is not None or dynamic.dim() == 4 or not triton_mixed.supports(gate, activations, hard):
        return KERNELS["compiled" if gate.is_cuda else "chunked"](gate, up, alpha, dynamic, noise, tau, activations,
                                                                  hard, routing_map)
    h, tables = triton_mixed.forward(gate, up, alpha, dynamic, noise, tau, activations)
    return h, ("triton", *tables, tau)


KERNELS["triton"] = _triton_forward


def _native_forward(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map=None):
    """The hand-written CPU kernel (`fused_native`) where it applies, else "compiled"."""
    if not fused_native.applies(gate, up, dynamic, activations, hard, routing_map):
        return KERNELS["compiled"](gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map)
    result = fused_native.forward(gate, up, alpha, dynamic, noise, tau, activations)
    return fused_native.checked("forward", fused_native.signature(gate, up, dynamic, noise, activations), result,
                                lambda: chunked_forward(gate, up, alpha, dynamic, noise, tau, activations, False))


KERNELS["native"] = _native_forward


def _native_backward(grad, gate, up, state, activations, routing_grads):
    _, alpha, dynamic, noise, tau = state
    result = fused_native.backward(grad, gate, up, alpha, dynamic, noise, tau, activations, routing_grads)
    key = fused_native.signature(gate, up, dynamic, noise, activations, routing_grads)
    return fused_native.checked("backward", key, result,
                                lambda: chunked_backward(grad, gate, up, alpha, dynamic, noise, tau, None, activations,
                                                         False, routing_grads))


def _backward(kernel, grad, gate, up, state, activations, hard, routing_grads):
    if state[0] == "native":
        return _native_backward(grad, gate, up, state, activations, routing_grads and not hard)
    if state[0] == "chunked":
        return chunked_backward(grad, gate, up, *state[1:], activations, hard, routing_grads)
    if state[0] == "triton":
        *tables, tau = state[1:]
        shape = (gate.shape[0], tables[1].shape[2], len(activations))  # dynamic's (B, T', K)
        return (*triton_mixed.backward(grad, gate, up, tables, tau, activations, shape, routing_grads and not hard),
                None)
    backward = _compiled_dense_backward if kernel == "compiled" else functools.partial(dense_backward, DENSE_CORES)
    return backward(grad, gate, up, state, activations, hard, routing_grads)


class MixedActivation(torch.autograd.Function):
    """h = sum_k g_k act_k(gate) * up; saves only gate, up and the small routing state.

    Autocast is off inside, both ways: the routing math and the mix run in float32 (float64 for
    float64 inputs) whatever the autocast dtype, on gate/up in their own dtype (bf16 under bf16
    autocast), and h comes back in gate's dtype.
    """

    @staticmethod
    def forward(ctx, gate, up, alpha, dynamic, noise, tau, activations, hard, kernel, routing_map):
        with torch.autocast(gate.device.type, enabled=False):
            h, (form, *tensors) = KERNELS[kernel](gate, up, alpha, dynamic, noise, tau, activations, hard,
                                                  routing_map)
        ctx.save_for_backward(gate, up, *tensors)
        ctx.form, ctx.activations, ctx.hard, ctx.kernel = form, activations, hard, kernel
        ctx.routing_dtypes = alpha.dtype, dynamic.dtype, None if routing_map is None else routing_map.dtype
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, up, *tensors = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(gate.device.type, enabled=False):
            d_gate, d_up, d_alpha, d_dynamic, d_map = _backward(
                ctx.kernel, grad.contiguous(), gate, up, (ctx.form, *tensors), ctx.activations, ctx.hard,
                need[2] or need[3] or need[9])
        alpha_dtype, dynamic_dtype, map_dtype = ctx.routing_dtypes
        if d_alpha is not None:  # None with hard routing: nothing flows to the routing inputs
            d_alpha, d_dynamic = d_alpha.to(alpha_dtype), d_dynamic.to(dynamic_dtype)
            d_map = None if d_map is None else d_map.to(map_dtype)
        return (d_gate if need[0] else None, d_up if need[1] else None, d_alpha if need[2] else None,
                d_dynamic if need[3] else None, None, None, None, None, None, d_map if need[9] else None)


_kernel_choice: ContextVar[str | None] = ContextVar("polyglu_mixed_kernel", default=None)


@contextlib.contextmanager
def use_kernel(kernel: str | None):
    """Within the block, compute the mixed activation with `kernel` (None: the default choice)."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"mixed-activation kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    token = _kernel_choice.set(kernel)
    try:
        yield
    finally:
        _kernel_choice.reset(token)


# CPU calls with at least this many hidden units (B * T * d_ff) compile by default: enough work to
# repay a one-off compile, and eager ops cost the most there (None: never compile by default on CPU).
# A call that needs gradients (training: many steps of one shape) compiles from a quarter of it: at
# the demo's shape with batches of 4 (2^19 units) a float32 step took 1.105x SwiGLU's compiled and
# 1.44x eager ("chunked"), one thread, AVX-512 (docs/performance.md)
COMPILE_MIN_ELEMENTS: int | None = 1 << 20

def default_kernel(gate: torch.Tensor) -> str:
    """"dense" while torch.compile traces (the math joins the caller's graph); else a `use_kernel`
    choice; else the environment variable POLYGLU_MIXED_KERNEL; else "triton" on CUDA with Triton
    installed, "native" on CPU ("compiled" with POLYGLU_NATIVE=0) from COMPILE_MIN_ELEMENTS hidden
    units (a quarter of it for a call that needs gradients), "chunked" otherwise."""
    if torch.compiler.is_compiling():
        return "dense"
    chosen = _kernel_choice.get() or os.environ.get("POLYGLU_MIXED_KERNEL") or None
    if chosen is not None:
        if chosen not in KERNELS:
            raise ValueError(f"POLYGLU_MIXED_KERNEL must be one of {', '.join(KERNELS)}, got {chosen!r}")
        return chosen
    if gate.is_cuda:
        return "triton" if _triton_available() else "chunked"
    if gate.device.type == "cpu" and COMPILE_MIN_ELEMENTS is not None:
        training = gate.requires_grad and torch.is_grad_enabled()
        if gate.numel() >= (COMPILE_MIN_ELEMENTS // 4 if training else COMPILE_MIN_ELEMENTS):
            return "compiled" if native.mode() == "off" else "native"
    return "chunked"


def native_chosen(units: int, device: torch.device, needs_grad: bool) -> bool:
    """Whether `default_kernel` picks "native" for a call of `units` hidden units on `device` (outside a
    trace; `needs_grad`: a training call)."""
    if torch.compiler.is_compiling() or device.type != "cpu":
        return False
    chosen = _kernel_choice.get() or os.environ.get("POLYGLU_MIXED_KERNEL") or None
    if chosen is not None:
        return chosen == "native"
    if COMPILE_MIN_ELEMENTS is None:
        return False
    return units >= (COMPILE_MIN_ELEMENTS // 4 if needs_grad else COMPILE_MIN_ELEMENTS) and native.mode() != "off"


def chosen_kernel() -> str | None:
    """The kernel chosen explicitly (`use_kernel`, else POLYGLU_MIXED_KERNEL), or None."""
    return _kernel_choice.get() or os.environ.get("POLYGLU_MIXED_KERNEL") or None


def mixed_activation_fused(gate: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor, dynamic: torch.Tensor,
                           noise: torch.Tensor | None, tau: torch.Tensor, activations: tuple[str, ...],
                           hard: bool = False, kernel: str | None = None,
                           routing_map: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k g_k act_k(gate) * up with g = softmax((alpha + dynamic + noise) / tau) over k (its one-hot
    argmax when `hard`), computed without keeping K x d_ff per token for backward.

    gate, up: (B, T, F); alpha: (F, K); dynamic: (B, T', K), T' in {1, T}, or per neuron (B, T', F, K);
    noise: (B, F, K) or None;
    tau: 0-dim tensor. Returns (B, T, F) in gate's dtype; routing math in float32. `kernel`:
    "chunked", "dense", "compiled" or "triton" (default: `default_kernel(gate)`).
    `routing_map` (F, K, r): per-neuron logits in rank form, dynamic then (B, T', r) and each unit's
    dynamic logits sum_r dynamic[..., r] * routing_map[f, k, r] (`fused_dense.unit_logits`), computed
    inside the kernel's loops; routing_map gets its gradient.
    """
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"mixed-activation kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    B, T, F_ = gate.shape
    K = len(activations)
    rank = None if routing_map is None else routing_map.shape[-1]
    if up.shape != gate.shape or tuple(alpha.shape) != (F_, K) or dynamic.dim() not in (3, 4) \
            or dynamic.shape[0] != B or dynamic.shape[1] not in (1, T) or dynamic.shape[-1] != (rank or K) \
            or (dynamic.dim() == 4 and (dynamic.shape[2] != F_ or rank is not None)) \
            or (rank is not None and tuple(routing_map.shape) != (F_, K, rank)) \
            or (noise is not None and tuple(noise.shape) != (B, F_, K)):
        raise ValueError(f"mixed activation: inconsistent shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                         f"alpha {tuple(alpha.shape)}, dynamic {tuple(dynamic.shape)}, noise "
                         f"{None if noise is None else tuple(noise.shape)}"
                         f"{'' if rank is None else f', routing_map {tuple(routing_map.shape)}'} for {K} activations")
    kernel = kernel or default_kernel(gate)
    gate, up = gate.contiguous(), up.contiguous()
    return MixedActivation.apply(gate, up, alpha, dynamic, noise, tau, tuple(activations), hard, kernel, routing_map)


def glu_kernel_applies(gate: torch.Tensor, activation: str) -> bool:
    """Whether a fixed-activation GLU (the SwiGLU baseline) runs `glu_fused`: when PolyGLU's default
    kernel here is "triton" and it covers the activation, outside small inference calls and traces."""
    # traced (a compiled decode step, compiled blocks): the plain ops join the graph; the context
    # variable below is never read under a trace (fullgraph would break on it)
    if torch.compiler.is_compiling():
        return False
    if not gate.is_cuda and _kernel_choice.get() != "triton":  # CPU: the plain ops, decided in ~0.1 us
        return False
    # a small call without autograd (a decode step): the plain ops, as PolyGLU's small-inference path
    small = gate.numel() <= SMALL_GLU_ELEMENTS and not (torch.is_grad_enabled() and gate.requires_grad)
    return not small and default_kernel(gate) == "triton" and triton_mixed.supports(gate, (activation,), False)


# GLU calls up to this many hidden units without autograd take plain ops (the size below which
# `small_inference` serves PolyGLU: polyglu.model.small_inference.SMALL_INFERENCE_ELEMENTS)
SMALL_GLU_ELEMENTS = 1 << 16


def glu_fused(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up through the "triton" kernel with one activation (its routing weight is 1, no
    routing gradient): on CUDA the GLU baselines run the same fused kernel as PolyGLU (one pass each
    way, activation recomputed in backward), so a PolyGLU / SwiGLU comparison measures the routing,
    not two kernel styles."""
    B, _, F_ = gate.shape
    alpha = torch.zeros((F_, 1), device=gate.device)
    dynamic = torch.zeros((B, 1, 1), device=gate.device)
    tau = torch.ones((), device=gate.device)
    return MixedActivation.apply(gate.contiguous(), up.contiguous(), alpha, dynamic, None, tau, (activation,), False,
                                 "triton", None)
