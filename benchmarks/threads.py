"""Training-step time on one thread against all usable threads, side by side (the measurement behind
`train.threads: null`, polyglu.hardware.choose_threads).

One model (default: the demo's, B=8, T=256, 4 documents per row, the trainer's autocast choice);
its steps alternate between 1 thread and N threads (default: every CPU this process may use) in one
process, so the machine's load hits both alike. Wall time (threads share the work, so CPU time would
not show the gain). Prints the medians and N-threads / 1-thread; `--json` one JSON object.

    python benchmarks/threads.py                       # demo shape, 1 vs all usable CPUs
    python benchmarks/threads.py --steps 10 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polyglu import hardware  # noqa: E402
from polyglu.config import MODEL_PRESETS, ModelConfig  # noqa: E402
from polyglu.model.fused import KERNELS, use_kernel  # noqa: E402
from polyglu.model.transformer import PolychromaticLM  # noqa: E402
from polyglu.train.loss import chunked_cross_entropy_sum  # noqa: E402
from polyglu.train.optim import default_optimizer  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", choices=tuple(MODEL_PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="N (default: the CPUs this process may use)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per thread count")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--fused-kernel", default="auto", choices=("auto", *KERNELS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    many = args.threads or hardware.usable_cpus()[0]
    precision = hardware.choose_precision(args.dtype, "cpu")
    torch.manual_seed(0)
    model = PolychromaticLM(ModelConfig.from_preset(args.preset, max_seq_len=max(
        args.seq_len, MODEL_PRESETS[args.preset].get("max_seq_len", 0)))).train()
    optimizer = default_optimizer(model)  # the trainer's AdamW (fused where torch has it)
    tokens = torch.randint(model.config.vocab_size, (args.batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    doc_ids = (torch.arange(args.seq_len) * args.documents // args.seq_len).expand(args.batch, -1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.name == "bfloat16"):
            out = model(tokens[:, :-1], doc_ids, compute_logits=False)
            loss = chunked_cross_entropy_sum(out.hidden_states, model.lm_head.weight, tokens[:, 1:], 2048)
        loss.backward()
        optimizer.step()

    times: dict[int, list[float]] = {1: [], many: []}
    with use_kernel(None if args.fused_kernel == "auto" else args.fused_kernel):
        for i in range(args.steps + 1):  # the first round warms up
            for n in times:
                torch.set_num_threads(n)
                start = time.perf_counter()
                step()
                if i:
                    times[n].append(time.perf_counter() - start)
    torch.set_num_threads(1)
    result = {"setup": {**vars(args), "threads": many, "dtype": precision.name},
              "environment": {**hardware.environment("cpu", precision.name), "threads": [1, many],
                              "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
              "median_s": {str(n): statistics.median(t) for n, t in times.items()},
              "samples_s": {str(n): t for n, t in times.items()}}
    result["many_over_one"] = result["median_s"][str(many)] / result["median_s"]["1"]
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"environment: {hardware.describe_environment({**result['environment'], 'threads': f'1 vs {many}'})}, "
          f"load average {result['environment']['load_average']}")
    for n in times:
        print(f"{n:>2} thread(s): step median {result['median_s'][str(n)] * 1e3:8.1f} ms")
    print(f"{many} threads / 1 thread step time: {result['many_over_one']:.2f} (median of {args.steps}; < 1: faster)")
    return result


if __name__ == "__main__":
    main()
