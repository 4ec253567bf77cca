"""The compiled mixed-activation kernel against the plain-autograd reference, outputs and all gradients,
across the conditions that make inductor generate new code. Run in its own process by
tests/test_fused.py, under glibc's debug allocator (MALLOC_CHECK_=3: heap corruption aborts the run;
MALLOC_PERTURB_: memory read before it is written holds a byte pattern, not zeros).

    python tests/scripts/compiled_kernel_sweep.py [--full]

Conditions (each row a new compiled graph): routing forms "factored" and "exact" and the switch
between them (tau and logit magnitudes sweeping through the float32 underflow threshold, as a
training run's annealing does), shared weights (T' = 1, "given"), odd sizes (no multiple of any
vector width), strided inputs, training (Gumbel noise) and evaluation (none), soft and hard routing;
--full adds bf16 inputs, a second set of sizes and per-neuron routing in rank form. Prints one line per case; exits 1 on a mismatch,
or if the kernel fell back to the eager kernels (which would hide a fault).
"""

import sys
import warnings

import torch

from polyglu.model import fused, fused_dense
from polyglu.model.polyglu import mixed_activation_reference, neuron_logits

ACTIVATIONS = ("relu", "tanh", "silu", "gelu")


def inputs(B, T, F, per_token, noise, scale, tau, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=gen, dtype=torch.float64)).float()

    # gate and up as strided views of a wider projection, as a fused gate/up matmul would give them
    both = randn(B, T, 2 * F + 3, s=2.0).to(dtype)
    gate, up = both[..., :F].requires_grad_(), both[..., F + 3:].requires_grad_()
    alpha = randn(F, 4, s=scale).requires_grad_()
    dynamic = randn(B, T if per_token else 1, 4, s=scale).requires_grad_()
    gumbel = randn(B, F, 4) if noise else None
    return gate.detach().requires_grad_(), up.detach().requires_grad_(), alpha, dynamic, gumbel, torch.tensor(tau)


def run(fn, args, hard, **kwargs):
    gate, up, alpha, dynamic, noise, tau = args
    for t in (gate, up, alpha, dynamic):
        t.grad = None
    h = fn(gate[:, :, :], up, alpha, dynamic, noise, tau, ACTIVATIONS, hard, **kwargs)
    h.backward(torch.randn(h.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(h.dtype))
    return [h.detach()] + [None if t.grad is None else t.grad.clone() for t in (gate, up, alpha, dynamic)]


def run_rank(fn, args, rank_args, **kwargs):
    """Per-neuron routing in rank form (gate_net's r outputs, the (F, K, r) map): all five gradients."""
    gate, up, alpha, _, noise, tau = args
    dynamic, routing_map = rank_args
    leaves = (gate, up, alpha, dynamic, routing_map)
    for t in leaves:
        t.grad = None
    h = fn(gate, up, alpha, dynamic, noise, tau, ACTIVATIONS, False, routing_map=routing_map, **kwargs)
    h.backward(torch.randn(h.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(h.dtype))
    return [h.detach()] + [None if t.grad is None else t.grad.clone() for t in leaves]


def rank_reference(gate, up, alpha, dynamic, noise, tau, activations, hard, routing_map):
    return mixed_activation_reference(gate, up, alpha, neuron_logits(dynamic, routing_map), noise, tau, activations,
                                      hard)


def compare(got, expected, dtype):
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    worst = 0.0
    for a, b in zip(got, expected):
        if (a is None) != (b is None):
            return float("inf")
        if a is None:
            continue
        a, b = a.double(), b.double()
        if not bool(a.isfinite().all()):
            return float("nan")
        worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6))
    return worst if worst <= tolerance else -worst


def main(full: bool) -> int:
    forms = set()
    layout = fused_dense._dense_layout

    def spy(*args, **kwargs):
        state = layout(*args, **kwargs)
        forms.add(state[0])
        return state

    fused_dense._dense_layout = spy
    sizes = [(2, 33, 44)] + ([(3, 17, 100)] if full else [])
    dtypes = [torch.float32] + ([torch.bfloat16] if full else [])
    # (per_token, noise, hard, [(logit scale, tau), ...]): a sequence of calls on one compiled kernel
    sweeps = [
        (True, True, False, [(1.0, 1.0), (40.0, 0.15), (1.0, 0.5), (80.0, 0.1), (1.0, 1.0)]),  # training: factored <-> exact
        (True, False, True, [(40.0, 0.15)]),  # evaluation, hard routing
    ]
    if full:
        sweeps += [(True, False, False, [(1.0, 1.0), (40.0, 0.15)]),  # evaluation, soft
                   (False, True, False, [(1.0, 1.0), (5.0, 0.2)])]  # shared weights (T' = 1)
    failures = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager kernels is a failure here
        for B, T, F in sizes:
            for dtype in dtypes:
                for per_token, noise, hard, steps in sweeps:
                    for i, (scale, tau) in enumerate(steps):
                        args = inputs(B, T, F, per_token, noise, scale, tau, dtype, seed=i)
                        expected = run(mixed_activation_reference, args, hard)
                        got = run(fused.mixed_activation_fused, args, hard, kernel="compiled")
                        result = compare(got, expected, dtype)
                        ok = result == result and result >= 0
                        failures += not ok
                        print(f"{'ok ' if ok else 'BAD'} B{B} T{T} F{F} {str(dtype)[6:]} per_token={per_token} "
                              f"noise={noise} hard={hard} scale={scale} tau={tau}: relative error {abs(result):.2g}",
                              flush=True)
        # --full: per-neuron routing in rank form (routing_scope="neuron"), per token and shared
        for per_token in ((True, False) if full else ()):
            for B, T, F in sizes:
                args = inputs(B, T, F, per_token, True, 1.0, 0.5, torch.float32, seed=3)
                gen = torch.Generator().manual_seed(4)
                rank_args = (torch.randn(B, T if per_token else 1, 3, generator=gen).requires_grad_(),
                             torch.randn(F, 4, 3, generator=gen).requires_grad_())
                expected = run_rank(rank_reference, args, rank_args)
                got = run_rank(fused.mixed_activation_fused, args, rank_args, kernel="compiled")
                result = compare(got, expected, torch.float32)
                ok = result == result and result >= 0
                failures += not ok
                print(f"{'ok ' if ok else 'BAD'} B{B} T{T} F{F} rank form per_token={per_token}: relative error "
                      f"{abs(result):.2g}", flush=True)
    missing = {"factored", "exact"} - forms
    print(f"{failures} failed; routing forms compiled: {', '.join(sorted(forms))}")
    if missing:
        print(f"the sweep never reached the {' and '.join(sorted(missing))} form")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main("--full" in sys.argv))
