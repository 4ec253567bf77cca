"""Training-step throughput, side by side: PolychromaticLM with PolyGLU vs with SwiGLU FFNs.

One step = forward, next-token cross-entropy, backward, AdamW step, in the trainer's precision:
float32 weights, and with bfloat16 (what `auto` picks where bf16 is native) the forward under bf16
autocast, as `polyglu.train.trainer` runs it. Both models are built from the same preset (default
`small`) with the same seed and data, and their steps alternate, so machine load hits both alike.
The optimizer is the trainer's (`polyglu.train.optim.default_optimizer`: AdamW, fused where torch has
it). Prints tokens/s (median and best over `--steps`) and the PolyGLU/SwiGLU time ratio three ways:
of the medians, of the best steps, and the median over step pairs of PolyGLU's step over the SwiGLU
step just before it (the steadiest where the machine's speed drifts: see docs/performance.md);
`--json` prints one JSON object instead.

    python benchmarks/train_step.py                                   # small, B=4 T=256, CPU f32
    python benchmarks/train_step.py --preset demo --threads 1 --clock cpu  # the demo's step: B=8 T=256, packed
    python benchmarks/train_step.py --layers 4 --steps 5 --fused-kernel compiled
    python benchmarks/train_step.py --threads 1 --clock cpu          # work done, robust on a loaded machine
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --batch 16 --seq-len 2048
    python benchmarks/train_step.py --preset demo --threads 1 --clock cpu --neuron   # + routing_scope neuron

`--neuron` adds a third model, PolyGLU with per-neuron dynamic routing (routing_scope="neuron",
rank `--routing-rank`), in the same interleaved loop, and prints its step time over the layer scope's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from polyglu import hardware
from polyglu.config import MODEL_PRESETS, ModelConfig
from polyglu.model.fused import KERNELS, use_kernel
from polyglu.model.transformer import PolychromaticLM
from polyglu.train.optim import default_optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=tuple(MODEL_PRESETS))
    p.add_argument("--batch", type=int, default=None, help="default: 8 for the demo preset (its training batch, configs/demo.yaml), else 4")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--documents", type=int, default=None,
                   help="documents packed per row, passed as doc_ids as the trainer does (default: 4 for the "
                        "demo preset, else 1 = no doc_ids)")
    p.add_argument("--layers", type=int, default=None, help="override n_layers")
    p.add_argument("--pool", default=None, choices=("causal", "sequence", "token"), help="override routing_pool")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="auto: bfloat16 where the device computes it natively, else float32 (polyglu.hardware)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall time, or this process's CPU time (meaningful with --threads 1 on CPU)")
    p.add_argument("--fused-kernel", default="auto", choices=("auto", *KERNELS),
                   help="kernel of the fused mixed activation (auto: the default choice)")
    p.add_argument("--neuron", action="store_true",
                   help="also time PolyGLU with routing_scope='neuron' and print its ratio to the layer scope")
    p.add_argument("--routing-rank", type=int, default=4, help="routing_rank of the --neuron model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    demo = args.preset == "demo"
    args.batch = args.batch if args.batch is not None else (8 if demo else 4)
    if args.dtype == "auto":
        args.dtype = hardware.choose_precision("auto", args.device).name
    args.documents = args.documents if args.documents is not None else (4 if demo else 1)
    if not 1 <= args.documents <= args.seq_len:
        p.error(f"--documents must be between 1 and --seq-len ({args.seq_len}), got {args.documents}")
    return args


def build(args, ffn: str) -> tuple[PolychromaticLM, torch.optim.Optimizer]:
    """`ffn` "swiglu", "polyglu" or "polyglu-neuron" (routing_scope neuron)."""
    overrides = {"ffn": ffn, "max_seq_len": max(args.seq_len, MODEL_PRESETS[args.preset].get("max_seq_len", 0))}
    if ffn == "polyglu-neuron":
        overrides.update(ffn="polyglu", routing_scope="neuron", routing_rank=args.routing_rank)
    if args.layers is not None:
        overrides["n_layers"] = args.layers
    if args.pool is not None:
        overrides["routing_pool"] = args.pool
    config = ModelConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = PolychromaticLM(config).to(device=args.device).train()  # float32 weights, as the trainer keeps them
    optimizer = default_optimizer(model)  # the trainer's AdamW (fused where torch has it)
    return model, optimizer


def train_step(model, optimizer, tokens: torch.Tensor, doc_ids: torch.Tensor | None,
               dtype: torch.dtype = torch.float32) -> float:
    """One step; `dtype` bfloat16: the forward under bf16 autocast (the trainer's `_autocast`)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(tokens[:, :-1], doc_ids).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    return loss.item()  # a sync point on any device


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {ffn: build(args, ffn) for ffn in ("swiglu", "polyglu", *(("polyglu-neuron",) if args.neuron else ()))}
    vocab = models["swiglu"][0].config.vocab_size
    tokens = torch.randint(vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)
    doc_ids = None
    if args.documents > 1:  # equal documents side by side in every row
        doc_ids = (torch.arange(args.seq_len) * args.documents // args.seq_len).expand(args.batch, -1).to(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {ffn: [] for ffn in models}
    losses: dict[str, float] = {}
    with use_kernel(None if args.fused_kernel == "auto" else args.fused_kernel):
        for step in range(args.warmup + args.steps):
            for ffn, (model, optimizer) in models.items():
                start = clock()
                losses[ffn] = train_step(model, optimizer, tokens, doc_ids, DTYPES[args.dtype])
                if step >= args.warmup:
                    times[ffn].append(clock() - start)
    n_tokens = args.batch * args.seq_len
    results = {ffn: {"median_s": statistics.median(t), "min_s": min(t), "samples_s": t,
                     "tokens_per_s_median": n_tokens / statistics.median(t), "tokens_per_s_best": n_tokens / min(t),
                     "parameters": sum(p.numel() for p in models[ffn][0].parameters()), "last_loss": losses[ffn]}
               for ffn, t in times.items()}
    # each step's PolyGLU time over the SwiGLU step just before it: the two run seconds apart, so a
    # machine whose speed drifts between runs (a shared VM) moves both alike; the median of these pairs
    # held within +-0.4% over four two-thread runs whose ratio of medians spread over 1.02-1.05
    paired = statistics.median(p / s for s, p in zip(times["swiglu"], times["polyglu"]))
    ratio = {"median": results["polyglu"]["median_s"] / results["swiglu"]["median_s"],
             "min": results["polyglu"]["min_s"] / results["swiglu"]["min_s"], "paired_median": paired}
    if args.neuron:
        ratio["neuron_over_layer_median"] = results["polyglu-neuron"]["median_s"] / results["polyglu"]["median_s"]
        ratio["neuron_over_layer_min"] = results["polyglu-neuron"]["min_s"] / results["polyglu"]["min_s"]
    config = models["polyglu"][0].config
    setup = {k: v for k, v in vars(args).items() if k != "json"}
    setup.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                 n_layers=config.n_layers, d_model=config.d_model, d_ff=config.d_ff, routing_pool=config.routing_pool)
    environment = hardware.environment(args.device, args.dtype)
    if args.json:
        print(json.dumps({"setup": setup, "environment": environment, "results": results,
                          "polyglu_over_swiglu_time": ratio}, indent=2))
        return
    print(f"environment: {hardware.describe_environment(environment)}")
    print(f"train step: preset={args.preset} layers={config.n_layers} d_model={config.d_model} d_ff={config.d_ff} "
          f"B={args.batch} T={args.seq_len} documents/row={args.documents} {args.device} {args.dtype} pool={config.routing_pool} "
          f"fused kernel={args.fused_kernel} threads={torch.get_num_threads()} steps={args.steps} clock={args.clock}")
    print(f"{'ffn':<14} {'params':>11} {'step med ms':>11} {'step min ms':>11} {'tok/s med':>10} {'tok/s best':>10}")
    for ffn, r in results.items():
        print(f"{ffn:<14} {r['parameters']:>11,} {r['median_s'] * 1e3:>11.1f} {r['min_s'] * 1e3:>11.1f} "
              f"{r['tokens_per_s_median']:>10.0f} {r['tokens_per_s_best']:>10.0f}")
    print(f"polyglu / swiglu step time: {ratio['median']:.3f} (median), {ratio['min']:.3f} (best), "
          f"{ratio['paired_median']:.3f} (median of step pairs)")
    if args.neuron:
        print(f"neuron / layer scope step time: {ratio['neuron_over_layer_median']:.3f} (median), "
              f"{ratio['neuron_over_layer_min']:.3f} (best)")


if __name__ == "__main__":
    main()
