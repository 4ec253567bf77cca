"""Cached greedy decoding speed: the static-shape decode step eager and compiled, against the
growing-cache forward it replaced and against full recompute (the original project's only path).

The `small` preset with random weights, CPU float32, a 32-token prompt, batch 1 and 64. Per batch
size, the variants run interleaved (one run of each, `--repeats` times) so that load on a shared
machine hits them alike; tokens/s are medians and ratios are against the eager decode step.

- step-eager:    polyglu.inference.DecodeStep(model) — attention over the whole preallocated cache
                 under a mask: every step has the same shapes (what generate() uses).
- step-compiled: DecodeStep(model, compile=True) — the same step captured whole by torch.compile
                 (compile time reported separately, not in tokens/s).
- forward:       model(next_ids, cache=cache): attention over the filled prefix, one length per step.
- recompute:     generate(..., use_cache=False): every step re-runs the whole sequence (batch 1 only).

    python benchmarks/decode.py                            # the table; --json for machines
    python benchmarks/decode.py --batch-sizes 1 --new-tokens 64 --repeats 3 --no-compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polyglu.config import ModelConfig  # noqa: E402
from polyglu.inference import DecodeStep, KVCache, generate  # noqa: E402
from polyglu.model.transformer import PolychromaticLM  # noqa: E402


def build(preset: str, ffn: str, seed: int = 0) -> PolychromaticLM:
    torch.manual_seed(seed)
    return PolychromaticLM(ModelConfig.from_preset(preset, ffn=ffn)).eval()


def greedy_decode(model, prompt_ids: torch.Tensor, new_tokens: int,
                  step: Callable[[torch.Tensor, object], torch.Tensor]) -> torch.Tensor:
    """Prefill, then `new_tokens - 1` steps of `step(next_ids (B, 1), cache) -> logits (B, V)`."""
    B, P = prompt_ids.shape
    cache = KVCache.for_model(model, B, P + new_tokens - 1)
    logits = model(prompt_ids, cache=cache).logits[:, -1]
    out = [logits.argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logits = step(out[-1], cache)
        out.append(logits.argmax(-1, keepdim=True))
    return torch.cat(out, 1)  # (B, new_tokens)


def forward_step(model) -> Callable:
    return lambda next_ids, cache: model(next_ids, cache=cache).logits[:, -1]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_batch(model, batch: int, args, generator: torch.Generator) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=generator)
    eager = DecodeStep(model)
    variants: dict[str, Callable[[], object]] = {
        "step-eager": lambda: greedy_decode(model, prompt, args.new_tokens, eager),
        "forward": lambda: greedy_decode(model, prompt, args.new_tokens, forward_step(model)),
    }
    compile_s = None
    if args.compile:
        compiled = DecodeStep(model, compile=True)
        compile_s = timed(lambda: greedy_decode(model, prompt, 3, compiled))  # compiles for this shape
        if not compiled.compiled:
            print("compilation failed: the compiled variant is skipped", file=sys.stderr)
        else:
            variants["step-compiled"] = lambda: greedy_decode(model, prompt, args.new_tokens, compiled)
            reference = greedy_decode(model, prompt, args.new_tokens, eager)
            assert torch.equal(variants["step-compiled"](), reference), "compiled step changed greedy tokens"
    if batch == 1 and args.recompute:
        variants["recompute"] = lambda: generate(model, prompt.tolist(), args.new_tokens, use_cache=False,
                                                 eos_token_id=[])
    greedy_decode(model, prompt, 3, eager)  # warm-up: allocator, rotary tables
    greedy_decode(model, prompt, 3, forward_step(model))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    tokens = batch * args.new_tokens
    base = statistics.median(times["step-eager"])
    row = {"batch": batch, "compile_s": compile_s, "variants": {}}
    for name, samples in times.items():
        median = statistics.median(samples)
        row["variants"][name] = {"seconds": median, "tokens_per_s": tokens / median,
                                 "speed_vs_step_eager": base / median}
    return row


def run(args) -> dict:
    model = build(args.preset, args.ffn)
    if args.layout == "columns":  # what polyglu's inference loader does
        model.use_decode_layout()
    generator = torch.Generator().manual_seed(0)
    rows = [measure_batch(model, batch, args, generator) for batch in args.batch_sizes]
    return {"preset": args.preset, "ffn": args.ffn, "layout": args.layout, "threads": torch.get_num_threads(),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--ffn", default="polyglu", choices=["polyglu", "swiglu"])
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per variant (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled variant")
    p.add_argument("--no-recompute", dest="recompute", action="store_false", help="skip full recompute")
    p.add_argument("--layout", default="columns", choices=["columns", "rows"],
                   help="linear weights column-major (the inference loader's layout, PolychromaticLM.use_decode_layout) or as built")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with torch.no_grad():
        result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.preset} preset ({args.ffn}), CPU float32, {args.layout} weights, {result['threads']} threads, "
          f"{args.prompt_len}-token prompt, {args.new_tokens} greedy tokens; median of {args.repeats} interleaved runs")
    print(f"{'batch':>5} {'variant':>14} {'tokens/s':>10} {'vs step-eager':>14}")
    for row in result["rows"]:
        for name, v in row["variants"].items():
            print(f"{row['batch']:>5} {name:>14} {v['tokens_per_s']:>10.1f} {v['speed_vs_step_eager']:>13.2f}x")
        if row["compile_s"] is not None:
            print(f"{row['batch']:>5} {'(compile s)':>14} {row['compile_s']:>10.1f}")


if __name__ == "__main__":
    main()
