"""Feed-forward block cost, side by side: SwiGLU vs PolyGLU (fused) vs PolyGLU (reference).

For each block, in one run and interleaved repeat by repeat (so machine load hits all alike):
forward time (autograd recording, as in training), forward+backward time, and the bytes autograd
saves for backward (distinct storages, parameters excluded; the input x is counted; on CUDA also the
peak memory of forward+backward). Prints medians, minima and ratios to SwiGLU; `--json` prints one
JSON object instead. PolyGLU fused runs once per `--fused-kernels` entry ("auto" = what PolyGLU
uses by default at these sizes; "compiled" = torch.compile of the dense kernel, compiled during the
warm-up, which is not timed; "chunked" = eager).

    python benchmarks/ffn.py                                  # B=4 T=512 d_model=1024 d_ff=4096, CPU f32
    python benchmarks/ffn.py --pool sequence --repeats 7
    python benchmarks/ffn.py --threads 1 --clock cpu             # work done, robust on a loaded machine
    python benchmarks/ffn.py --device cuda --dtype bfloat16 --batch 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from polyglu import hardware
from polyglu.model.activations import ACTIVATIONS
from polyglu.model.fused import KERNELS, default_kernel, use_kernel
from polyglu.model.polyglu import PolyGLU, SwiGLU

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=4096)
    p.add_argument("--activations", default="relu,tanh,silu,gelu", help="comma-separated, from ACTIVATIONS")
    p.add_argument("--pool", default="causal", choices=("causal", "sequence", "token"), help="routing_pool")
    p.add_argument("--no-noise", action="store_true", help="train without Gumbel routing noise")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="auto: bfloat16 where the device computes it natively, else float32 (polyglu.hardware)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall time, or this process's CPU time (with --threads 1: the work done, whatever "
                        "else runs on the machine; OpenMP threads spin, so not meaningful with more threads)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block first (compile time excluded)")
    p.add_argument("--fused-kernels", default="auto,chunked,compiled",
                   help="comma-separated kernels for PolyGLU fused: auto (the default choice), " + ", ".join(KERNELS))
    p.add_argument("--skip-reference", action="store_true", help="leave out the (slow, memory-hungry) reference")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = hardware.choose_precision("auto", args.device).name
    for name in args.activations.split(","):
        if name not in ACTIVATIONS:
            p.error(f"--activations: unknown {name!r} (known: {', '.join(ACTIVATIONS)})")
    for name in args.fused_kernels.split(","):
        if name != "auto" and name not in KERNELS:
            p.error(f"--fused-kernels: unknown {name!r} (known: auto, {', '.join(KERNELS)})")
    return args


class WithKernel(nn.Module):
    """Runs a block with the fused mixed activation's kernel set to `kernel` (backward follows)."""

    def __init__(self, block: nn.Module, kernel: str) -> None:
        super().__init__()
        self.block, self.kernel = block, kernel

    def forward(self, x):
        with use_kernel(self.kernel):
            return self.block(x)


def build_blocks(args) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    activations = tuple(args.activations.split(","))
    blocks = {"swiglu": SwiGLU(args.d_model, args.d_ff)}
    kernels = []
    for kernel in args.fused_kernels.split(","):
        if kernel == "auto":  # resolve without allocating: an expanded tensor has the numel, not the memory
            hidden = torch.empty(1, device=args.device, dtype=DTYPES[args.dtype]).expand(
                args.batch, args.seq_len, args.d_ff)
            kernel = default_kernel(hidden)
        if kernel not in kernels:
            kernels.append(kernel)
    variants = [("fused", kernel) for kernel in kernels]
    variants += [] if args.skip_reference else [("reference", None)]
    for impl, kernel in variants:
        block = PolyGLU(args.d_model, args.d_ff, activations, routing_pool=args.pool,
                        routing_noise=not args.no_noise, mixed_impl=impl)
        # same projection weights everywhere: the blocks differ only in the activation
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block, name).weight.copy_(getattr(blocks["swiglu"], name).weight)
        blocks[f"polyglu_{impl}" + (f"_{kernel}" if kernel else "")] = WithKernel(block, kernel) if kernel else block
    for name, block in blocks.items():
        block.to(device=args.device, dtype=DTYPES[args.dtype]).train()
        if args.compile:
            blocks[name] = torch.compile(block)
    return blocks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters and buffers excluded."""
    excluded = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *block.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    del out
    return sum(storages.values())


def measure(blocks: dict[str, torch.nn.Module], args) -> dict[str, dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: {"forward": [], "forward_backward": []} for name in blocks}
    peaks = {}

    def forward(block):
        block(x)

    def forward_backward(block):
        block(x).backward(grad_out)

    for step in range(args.warmup + args.repeats):
        for name, block in blocks.items():
            for kind, fn in (("forward", forward), ("forward_backward", forward_backward)):
                block.zero_grad(set_to_none=True)
                x.grad = None
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                start = clock()
                fn(block)
                sync(device)
                if step >= args.warmup:
                    times[name][kind].append(clock() - start)
                if device.type == "cuda" and kind == "forward_backward":
                    peaks[name] = torch.cuda.max_memory_allocated(device) - base
    results = {}
    for name, block in blocks.items():
        entry = {"saved_bytes": saved_bytes(block, x), "peak_bytes": peaks.get(name)}
        for kind, samples in times[name].items():
            entry[kind] = {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}
        results[name] = entry
    base = results["swiglu"]
    for entry in results.values():
        entry["ratio_to_swiglu"] = {
            "forward_median": entry["forward"]["median_s"] / base["forward"]["median_s"],
            "forward_backward_median": entry["forward_backward"]["median_s"] / base["forward_backward"]["median_s"],
            "forward_backward_min": entry["forward_backward"]["min_s"] / base["forward_backward"]["min_s"],
            "saved_bytes": entry["saved_bytes"] / base["saved_bytes"],
        }
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = build_blocks(args)
    results = measure(blocks, args)
    setup = {k: v for k, v in vars(args).items() if k != "json"}
    hidden = torch.empty(1, device=args.device, dtype=DTYPES[args.dtype]).expand(args.batch, args.seq_len, args.d_ff)
    setup.update(default_kernel=default_kernel(hidden), torch=torch.__version__, threads=torch.get_num_threads(),
                 machine=platform.machine(),
                 device_name=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else
                 platform.processor() or "cpu")
    environment = hardware.environment(args.device, args.dtype)
    if args.json:
        print(json.dumps({"setup": setup, "environment": environment, "results": results}, indent=2))
        return
    print(f"environment: {hardware.describe_environment(environment)}")
    print(f"FFN B={args.batch} T={args.seq_len} d_model={args.d_model} d_ff={args.d_ff} {args.device} {args.dtype} "
          f"pool={args.pool} noise={not args.no_noise} activations={args.activations} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} clock={args.clock} "
          f"default fused kernel={setup['default_kernel']}")
    peak = any(r["peak_bytes"] is not None for r in results.values())
    header = (f"{'block':<26} {'fwd med ms':>10} {'fwd min ms':>10} {'f+b med ms':>10} {'f+b min ms':>10} "
              f"{'saved MiB':>9}" + (f" {'peak MiB':>8}" if peak else "") +
              f" | {'fwd x':>6} {'f+b x':>6} {'f+b min x':>9} {'saved x':>7}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        q = r["ratio_to_swiglu"]
        print(f"{name:<26} {r['forward']['median_s'] * 1e3:>10.1f} {r['forward']['min_s'] * 1e3:>10.1f} "
              f"{r['forward_backward']['median_s'] * 1e3:>10.1f} {r['forward_backward']['min_s'] * 1e3:>10.1f} "
              f"{r['saved_bytes'] / 2**20:>9.1f}" + (f" {r['peak_bytes'] / 2**20:>8.1f}" if peak else "") +
              f" | {q['forward_median']:>6.2f} {q['forward_backward_median']:>6.2f} "
              f"{q['forward_backward_min']:>9.2f} {q['saved_bytes']:>7.2f}")


if __name__ == "__main__":
    main()
