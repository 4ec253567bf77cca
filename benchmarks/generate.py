"""Generation speed: KV-cache decoding against the original's full recompute, PolyGLU against SwiGLU.

CPU (default): the `small` preset, random weights, one 32-token prompt; greedy decoding of 128 and
512 new tokens with the cache and with full recompute (every step re-runs the whole sequence, as the
original project did), and the cached decode time of a PolyGLU model against a SwiGLU model of the
same shape, runs interleaved so that load on a shared machine hits both alike.

    python benchmarks/generate.py                       # the table; --json for machines
    python benchmarks/generate.py --new-tokens 128 --threads 1

GPU target (`--paper`): the `paper-600m` shape, random weights, 1,319 prompts (GSM8K's test split)
of random lengths, 256 new tokens each (EOS disabled, so every row runs to the end), batched:

    python benchmarks/generate.py --paper --device cuda [--batch-size 512] [--dtype bfloat16]
    python benchmarks/generate.py --paper --device cpu --prompts 2 --new-tokens 4   # smoke check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polyglu.config import ModelConfig  # noqa: E402
from polyglu.inference import generate  # noqa: E402
from polyglu.model.transformer import PolychromaticLM  # noqa: E402


def build(preset: str, ffn: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
          **overrides) -> PolychromaticLM:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset, ffn=ffn, **overrides)
    with torch.device(device):
        model = PolychromaticLM(config)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, prompts, new_tokens: int, use_cache: bool, device: str = "cpu", batch_size=None) -> float:
    """Seconds to generate `new_tokens` greedy tokens after each prompt (prefill included)."""
    batch_size = batch_size or len(prompts)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        out = generate(model, prompts[i:i + batch_size], new_tokens, use_cache=use_cache, eos_token_id=[])
        assert int(out.lengths.min()) == new_tokens
    sync(device)
    return time.perf_counter() - start


def cpu_benchmark(args) -> dict:
    prompt = [torch.randint(0, 32_000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()]
    polyglu, swiglu = build(args.preset, "polyglu"), build(args.preset, "swiglu")
    generate(polyglu, prompt, 4)  # warm-up (allocator, lazily built tables)
    generate(swiglu, prompt, 4)
    rows = []
    for n in args.new_tokens:
        cached = [timed_generate(polyglu, prompt, n, True) for _ in range(args.repeats)]
        recompute = [timed_generate(polyglu, prompt, n, False) for _ in range(args.recompute_repeats)]
        rows.append({"new_tokens": n, "cached_s": statistics.median(cached),
                     "recompute_s": statistics.median(recompute),
                     "cached_tok_s": n / statistics.median(cached), "recompute_tok_s": n / statistics.median(recompute),
                     "speedup": statistics.median(recompute) / statistics.median(cached)})
    ratio_n = args.new_tokens[0]
    poly_times, swi_times = [], []
    for _ in range(args.repeats):  # interleaved: both see the same machine load
        poly_times.append(timed_generate(polyglu, prompt, ratio_n, True))
        swi_times.append(timed_generate(swiglu, prompt, ratio_n, True))
    return {"preset": args.preset, "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "rows": rows,
            "polyglu_vs_swiglu": {"new_tokens": ratio_n, "polyglu_s": statistics.median(poly_times),
                                  "swiglu_s": statistics.median(swi_times),
                                  "ratio": statistics.median(poly_times) / statistics.median(swi_times)}}


def paper_benchmark(args) -> dict:
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    model = build("paper-600m", "polyglu", device=args.device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    lo, hi = args.prompt_len_range
    lengths = torch.randint(lo, hi + 1, (args.prompts,), generator=gen).tolist()
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    prompts.sort(key=len, reverse=True)  # similar lengths share a batch
    generate(model, prompts[:2], 2)  # warm-up
    seconds = timed_generate(model, prompts, args.new_tokens, True, args.device, args.batch_size)
    tokens = args.prompts * args.new_tokens
    result = {"shape": "paper-600m", "device": args.device, "dtype": args.dtype, "prompts": args.prompts,
              "prompt_len_range": [lo, hi], "new_tokens": args.new_tokens, "batch_size": args.batch_size,
              "seconds": seconds, "generated_tok_s": tokens / seconds, "target_s": 600}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", default=None, help="comma-separated (CPU default 128,512; --paper 256)")
    p.add_argument("--repeats", type=int, default=3, help="cached runs per measurement (median)")
    p.add_argument("--recompute-repeats", type=int, default=1, help="full-recompute runs (slow)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--paper", action="store_true", help="the GPU target: paper-600m, 1,319 prompts x 256 tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="--paper only")
    p.add_argument("--prompts", type=int, default=1319, help="--paper only")
    p.add_argument("--prompt-len-range", type=int, nargs=2, default=(48, 200), metavar=("MIN", "MAX"))
    p.add_argument("--batch-size", type=int, default=512, help="--paper only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    default = "256" if args.paper else "128,512"
    args.new_tokens = [int(n) for n in (args.new_tokens or default).split(",")]

    if args.paper:
        args.new_tokens = args.new_tokens[0]
        result = paper_benchmark(args)
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(f"paper-600m {args.dtype} on {result.get('gpu', args.device)}: {args.prompts} prompts x "
              f"{args.new_tokens} tokens (batch {args.batch_size}) in {result['seconds']:.1f} s "
              f"({result['generated_tok_s']:,.0f} tok/s; target < 600 s)")
        return

    with torch.no_grad():
        result = cpu_benchmark(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.preset} preset, CPU float32, {torch.get_num_threads()} threads, {args.prompt_len}-token prompt, "
          f"batch 1, greedy; median of {args.repeats} cached / {args.recompute_repeats} recompute runs")
    print(f"{'new tokens':>10} {'cached tok/s':>13} {'recompute tok/s':>16} {'speedup':>8}")
    for r in result["rows"]:
        print(f"{r['new_tokens']:>10} {r['cached_tok_s']:>13.1f} {r['recompute_tok_s']:>16.1f} {r['speedup']:>7.1f}x")
    c = result["polyglu_vs_swiglu"]
    print(f"cached decode, {c['new_tokens']} tokens: PolyGLU {c['polyglu_s']:.2f} s, SwiGLU {c['swiglu_s']:.2f} s, "
          f"ratio {c['ratio']:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
