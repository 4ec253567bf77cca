"""The Triton kernels of `polyglu.model.triton_mixed` (imported only through it, on first use: this
module needs triton). Layouts: gate, up, grad, outputs (N = B * T, F) row-major; routing tables A, S
(K, B or 1, F) with strides (a_k, a_b, 1); E, D (K, B, T') with strides (e_k, e_b, e_t), e_t = 0 when
one weight serves the whole row."""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

try:  # triton >= 3.4 reads its settings through knobs
    from triton import knobs

    INTERPRETED = bool(knobs.runtime.interpret)
except ImportError:
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (in expressions a constexpr comes after a tensor operand: constexpr * tensor stays a constexpr in the
# interpreter)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
INV_SQRT2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
GELU_C: tl.constexpr = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
GELU_A: tl.constexpr = tl.constexpr(0.044715)
TINY: tl.constexpr = tl.constexpr(1e-30)  # a routing sum below this may have lost terms: exact softmax


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp2(-z * LOG2E))


@triton.jit
def _act(z, CODE: tl.constexpr):
    """a(z) in float32 for the activation with code CODE (triton_mixed.ACTIVATION_CODES)."""
    if CODE == 0:
        a = tl.maximum(z, 0.0)
    elif CODE == 1:
        a = 2.0 * _sigmoid(2.0 * z) - 1.0
    elif CODE == 2:
        a = z * _sigmoid(z)
    elif CODE == 3:
        a = 0.5 * z * (1.0 + tl.erf(z * INV_SQRT2))
    elif CODE == 4:
        a = z * _sigmoid(z * GELU_C * (1.0 + z * z * GELU_A))
    elif CODE == 5:
        a = z
    elif CODE == 6:
        a = _sigmoid(z)
    else:  # softplus: relu(z) + log(1 + e^-|z|)
        a = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp2(-tl.abs(z) * LOG2E))
    return a


@triton.jit
def _slope(z, a, CODE: tl.constexpr):
    """a'(z), given a = _act(z, CODE)."""
    if CODE == 0:
        d = (z > 0).to(tl.float32)
    elif CODE == 1:
        d = 1.0 - a * a
    elif CODE == 2:
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif CODE == 3:
        d = 0.5 * (1.0 + tl.erf(z * INV_SQRT2)) + z * INV_SQRT_2PI * tl.exp2(-0.5 * z * z * LOG2E)
    elif CODE == 4:
        s = _sigmoid(z * GELU_C * (1.0 + z * z * GELU_A))
        d = s + z * s * (1.0 - s) * ((1.0 + z * z * GELU_A * 3.0) * GELU_C)
    elif CODE == 5:
        d = z * 0.0 + 1.0
    elif CODE == 6:
        d = a * (1.0 - a)
    else:
        d = _sigmoid(z)
    return d


@triton.jit
def _load_pair(x_ptr, y_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok):
    """(table x at (k, row, unit) (BT, BF), table y at (k, row, position) (BT,))."""
    x = tl.load(x_ptr + k * a_k + a_offsets, mask=mask2, other=0.0)
    y = tl.load(y_ptr + k * e_k + e_offsets, mask=rows_ok, other=0.0)
    return x, y


@triton.jit
def _block_routing(a_ptr, e_ptr, s_ptr, d_ptr, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok,
                   K: tl.constexpr):
    """For one block: 1 / sum_k A_k E_k, whether it needs the exact softmax (a sum below TINY: decided
    here, on the device), and the exact softmax's max and 1 / sum (zeros when not needed)."""
    total = tl.zeros(mask2.shape, tl.float32)
    for k in tl.static_range(K):
        a, e = _load_pair(a_ptr, e_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok)
        total += a * e[:, None]
    low = tl.sum(((total < TINY) & mask2).to(tl.int32), axis=1)
    exact = tl.sum(low, axis=0) > 0
    top = tl.zeros(mask2.shape, tl.float32)
    inv_exact = tl.zeros(mask2.shape, tl.float32)
    if exact:
        top = tl.full(mask2.shape, -float("inf"), tl.float32)
        for k in tl.static_range(K):
            s, d = _load_pair(s_ptr, d_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok)
            top = tl.maximum(top, s + d[:, None])
        exact_total = tl.zeros(mask2.shape, tl.float32)
        for k in tl.static_range(K):
            s, d = _load_pair(s_ptr, d_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok)
            exact_total += tl.exp2((s + d[:, None] - top) * LOG2E)
        inv_exact = 1.0 / exact_total
    # a block on the exact path discards the factored weights: keep them finite there (no 1 / 0)
    inv_total = 1.0 / tl.where(mask2 & (total >= TINY), total, 1.0)
    return inv_total, exact, top, inv_exact


@triton.jit
def _weight(a_ptr, e_ptr, s_ptr, d_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok, inv_total, exact,
            top, inv_exact):
    """g_k for one block: A_k E_k / sum, or the exact softmax where the block needs it."""
    a, e = _load_pair(a_ptr, e_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok)
    g = a * e[:, None] * inv_total
    if exact:
        s, d = _load_pair(s_ptr, d_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok)
        g = tl.exp2((s + d[:, None] - top) * LOG2E) * inv_exact
    return g


@triton.jit
def _block_offsets(rows, cols, T, F, a_b, e_b, e_t):
    rows_b = rows // T
    offsets = rows[:, None].to(tl.int64) * F + cols[None, :]
    a_offsets = rows_b[:, None] * a_b + cols[None, :]
    e_offsets = rows_b * e_b + (rows % T) * e_t
    return offsets, a_offsets, e_offsets


@triton.jit
def forward_kernel(gate_ptr, up_ptr, out_ptr, a_ptr, e_ptr, s_ptr, d_ptr, N, T, F, a_k, a_b, e_k, e_b, e_t,
                   K: tl.constexpr, CODES: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    rows_ok = rows < N
    mask2 = rows_ok[:, None] & (cols < F)[None, :]
    offsets, a_offsets, e_offsets = _block_offsets(rows, cols, T, F, a_b, e_b, e_t)
    z = tl.load(gate_ptr + offsets, mask=mask2, other=0.0).to(tl.float32)
    inv_total, exact, top, inv_exact = _block_routing(a_ptr, e_ptr, s_ptr, d_ptr, a_offsets, e_offsets, a_k, e_k,
                                                      mask2, rows_ok, K)
    m = tl.zeros((BT, BF), tl.float32)
    for k in tl.static_range(K):
        g = _weight(a_ptr, e_ptr, s_ptr, d_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok, inv_total,
                    exact, top, inv_exact)
        m += g * _act(z, (CODES >> (4 * k)) & 15)
    u = tl.load(up_ptr + offsets, mask=mask2, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (m * u).to(out_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def backward_kernel(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, d_alpha_ptr, d_dyn_ptr,
                    a_ptr, e_ptr, s_ptr, d_ptr, N, T, F, a_k, a_b, e_k, e_b, e_t, ROW_PROGRAMS,
                    K: tl.constexpr, KP: tl.constexpr, CODES: tl.constexpr, ROUTING: tl.constexpr,
                    BT: tl.constexpr, BF: tl.constexpr):
    """Program (i, j): token blocks i, i + ROW_PROGRAMS, ... of unit block j. Writes d gate and d up;
    with ROUTING, d alpha's partial sums (ROW_PROGRAMS, K, F) and d dynamic's (F blocks, K, N), times tau."""
    pid_t = tl.program_id(0)
    pid_f = tl.program_id(1)
    cols = pid_f * BF + tl.arange(0, BF)
    cols_ok = cols < F
    ks = tl.arange(0, KP)
    alpha_acc = tl.zeros((KP, BF), tl.float32)
    for start in range(pid_t * BT, N, ROW_PROGRAMS * BT):
        rows = start + tl.arange(0, BT)
        rows_ok = rows < N
        mask2 = rows_ok[:, None] & cols_ok[None, :]
        offsets, a_offsets, e_offsets = _block_offsets(rows, cols, T, F, a_b, e_b, e_t)
        z = tl.load(gate_ptr + offsets, mask=mask2, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offsets, mask=mask2, other=0.0).to(tl.float32)
        dh = tl.load(grad_ptr + offsets, mask=mask2, other=0.0).to(tl.float32)
        inv_total, exact, top, inv_exact = _block_routing(a_ptr, e_ptr, s_ptr, d_ptr, a_offsets, e_offsets, a_k,
                                                          e_k, mask2, rows_ok, K)
        dm = dh * u
        m = tl.zeros((BT, BF), tl.float32)
        d_gate = tl.zeros((BT, BF), tl.float32)
        for k in tl.static_range(K):
            g = _weight(a_ptr, e_ptr, s_ptr, d_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok, inv_total,
                        exact, top, inv_exact)
            a = _act(z, (CODES >> (4 * k)) & 15)
            m += g * a
            d_gate += dm * g * _slope(z, a, (CODES >> (4 * k)) & 15)
        tl.store(d_up_ptr + offsets, (dh * m).to(d_up_ptr.dtype.element_ty), mask=mask2)
        tl.store(d_gate_ptr + offsets, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask2)
        if ROUTING:  # d l_k * tau = dm g_k (a_k - m), reduced over units (d dynamic) and tokens (d alpha)
            for k in tl.static_range(K):
                g = _weight(a_ptr, e_ptr, s_ptr, d_ptr, k, a_offsets, e_offsets, a_k, e_k, mask2, rows_ok,
                            inv_total, exact, top, inv_exact)
                dl = tl.where(mask2, dm * g * (_act(z, (CODES >> (4 * k)) & 15) - m), 0.0)
                tl.store(d_dyn_ptr + (pid_f * K + k).to(tl.int64) * N + rows, tl.sum(dl, axis=1), mask=rows_ok)
                alpha_acc += tl.where(ks[:, None] == k, tl.sum(dl, axis=0)[None, :], 0.0)
    if ROUTING:
        tl.store(d_alpha_ptr + (pid_t * K + ks[:, None]) * F + cols[None, :], alpha_acc,
                 mask=(ks[:, None] < K) & cols_ok[None, :])
