"""PolyGLU's mixed activation as two Triton kernels: the "triton" kernel choice of `polyglu.model.fused`.

The same math as the fused module's other kernels (see its docstring for the formulas):

    forward    h = m * up,  m = sum_k g_k a_k(gate)
    backward   d up = dh * m,  d gate = sum_k dh up g_k a_k'(gate),  d l_k = dh up g_k (a_k - m) / tau
               d alpha = d l summed over tokens,  d dynamic = d l summed over d_ff

Routing in the factored form: with S_k = (alpha_k + noise_k) / tau and D_k = dynamic_k / tau, each
shifted by its maximum over k (softmax-invariant), g_k = A_k E_k / sum_j A_j E_j with A = exp(S) per
(row, unit) and E = exp(D) per token: two small tensors computed by torch on the device, so the
kernels take no exponential per hidden unit for the routing. Where the sum could have lost terms to
float32 underflow (extreme logits over a small tau), a block recomputes an exact softmax of S + D in
the kernel: the fallback is decided on the device, per block, with no host sync. One weight per row
(T' = 1, sequence pooling) is the same form with E read at one position.

Backward is one pass over the hidden units: d gate, d up, and both routing gradients. d dynamic is a
sum over d_ff (each program writes its block's partial sums), d alpha a sum over tokens (each
program walks a strided set of token blocks and keeps its sums in registers): the alpha gradient is
folded into the gate/up pass rather than recomputing every activation in a second one. Partial sums
are reduced by torch afterwards, in a fixed order (deterministic).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the interpreter: how CI checks
these kernels against the reference without a GPU, tests/test_triton_mixed.py). Hard routing, more
than `MAX_ACTIVATIONS` activations, or an activation without a code here take the fused module's
other kernels (`supports`).
"""

from __future__ import annotations

import functools
import os

import torch

# activation name -> code the kernels branch on at compile time (a constexpr)
ACTIVATION_CODES = {"relu": 0, "tanh": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4, "identity": 5, "sigmoid": 6,
                    "softplus": 7}
MAX_ACTIVATIONS = 8  # codes are packed 4 bits each into one 32-bit constexpr
_TINY = 1e-30  # a sum of routing weights below this may have lost terms to underflow: exact softmax there


@functools.cache
def available() -> bool:
    """Triton importable (GPU kernels, or the interpreter on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(gate: torch.Tensor, activations: tuple[str, ...], hard: bool) -> bool:
    """Whether these kernels compute this call: Triton present, CUDA (or the interpreter on CPU), soft
    routing, at most MAX_ACTIVATIONS activations, each with a code."""
    return (available() and not hard and 1 <= len(activations) <= MAX_ACTIVATIONS
            and all(name in ACTIVATION_CODES for name in activations)
            and (gate.is_cuda or (gate.device.type == "cpu" and interpreting())))


def _packed_codes(activations: tuple[str, ...]) -> int:
    return sum(ACTIVATION_CODES[name] << (4 * k) for k, name in enumerate(activations))


def _kernels(interpret: bool):
    """The jitted kernels (`polyglu.model._triton_mixed_kernels`, imported on first use). Triton reads
    TRITON_INTERPRET once, when it is imported (its own library functions are decorated then): the
    interpreter must be asked for before the first import of triton in the process."""
    from polyglu.model import _triton_mixed_kernels as module

    if module.INTERPRETED != interpret:
        raise RuntimeError(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} now, but triton was "
                           f"imported with the interpreter {'on' if module.INTERPRETED else 'off'}: set it "
                           f"before anything imports triton")
    return module.forward_kernel, module.backward_kernel


def _routing_tables(alpha, dynamic, noise, tau):
    """A = exp(S), E = exp(D), S, D as contiguous float32: S (K, B|1, F) from alpha and noise, D
    (K, B, T') from dynamic, each over tau and shifted by its maximum over k."""
    tau = tau.detach().float()
    static = alpha.detach().float().t()[:, None, :]  # (K, 1, F)
    if noise is not None:
        static = static + noise.detach().float().permute(2, 0, 1)  # (K, B, F)
    static = static / tau
    static = (static - static.amax(0)).contiguous()
    dyn = dynamic.detach().float().permute(2, 0, 1) / tau  # (K, B, T')
    dyn = (dyn - dyn.amax(0)).contiguous()
    return static.exp(), dyn.exp(), static, dyn


# tokens x units per program: 16 x 128 hidden units, 8 KiB per float32 operand
BLOCK_TOKENS, BLOCK_UNITS = 16, 128


def _strides(a, e) -> tuple[int, int, int, int, int]:
    """(a_k, a_b, e_k, e_b, e_t): a (K, B|1, F) read with row stride 0 when it has one row (no noise);
    e (K, B, T') with position stride 0 when T' = 1 (one weight per row)."""
    return (a.stride(0), a.stride(1) if a.shape[1] > 1 else 0, e.stride(0), e.stride(1),
            e.stride(2) if e.shape[2] > 1 else 0)


def forward(gate, up, alpha, dynamic, noise, tau, activations: tuple[str, ...]):
    """h (B, T, F) in gate's dtype, and the routing tables backward reuses. gate, up contiguous."""
    forward_kernel, _ = _kernels(interpreting())
    B, T, F = gate.shape
    tables = _routing_tables(alpha, dynamic, noise, tau)
    out = torch.empty_like(gate)
    N = B * T
    grid = (-(-N // BLOCK_TOKENS), -(-F // BLOCK_UNITS))
    forward_kernel[grid](gate, up, out, *tables, N, T, F, *_strides(tables[0], tables[1]), K=len(activations),
                         CODES=_packed_codes(activations), BT=BLOCK_TOKENS, BF=BLOCK_UNITS)
    return out, tables


def backward(grad, gate, up, tables, tau, activations: tuple[str, ...], dynamic_shape, routing_grads: bool):
    """-> (d gate, d up, d alpha (F, K) float32 or None, d dynamic (B, T', K) float32 or None).
    grad, gate, up contiguous; `tables` from `forward`."""
    _, backward_kernel = _kernels(interpreting())
    B, T, F = gate.shape
    K = len(activations)
    N = B * T
    f_blocks = -(-F // BLOCK_UNITS)
    # programs over the tokens: enough to fill the device, few enough that d alpha's partials stay small
    row_programs = max(1, min(-(-N // BLOCK_TOKENS), 4 if gate.device.type == "cpu" else 64))
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    d_alpha_parts = d_dyn_parts = d_gate  # unused without routing gradients
    if routing_grads:
        d_alpha_parts = torch.empty((row_programs, K, F), device=gate.device, dtype=torch.float32)
        d_dyn_parts = torch.empty((f_blocks, K, N), device=gate.device, dtype=torch.float32)
    backward_kernel[(row_programs, f_blocks)](
        grad, gate, up, d_gate, d_up, d_alpha_parts, d_dyn_parts, *tables, N, T, F,
        *_strides(tables[0], tables[1]), row_programs, K=K, KP=max(2, 1 << (K - 1).bit_length()),
        CODES=_packed_codes(activations), ROUTING=routing_grads, BT=BLOCK_TOKENS, BF=BLOCK_UNITS)
    if not routing_grads:
        return d_gate, d_up, None, None
    inv_tau = 1 / tau.detach().float()
    d_alpha = d_alpha_parts.sum(0).t() * inv_tau  # (F, K)
    d_dynamic = d_dyn_parts.sum(0).view(K, B, T).permute(1, 2, 0) * inv_tau  # (B, T, K)
    if dynamic_shape[1] == 1:  # one weight per row: its gradient sums over the positions
        d_dynamic = d_dynamic.sum(1, keepdim=True)
    return d_gate, d_up, d_alpha, d_dynamic
