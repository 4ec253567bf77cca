"""Evaluation cost of the chunked head + cross-entropy under torch.no_grad: loss only (now) against
the autograd Function's forward, which also forms both gradients (what evaluation paid before).

Two measurements, each interleaved (before, after, before, ...) so machine load hits both alike:
1. the loss alone on (tokens x d_model) hidden states and a (vocab x d_model) head weight;
2. `Trainer.evaluate()` of a model preset (forward + loss) on random tokens.
Prints medians over `--repeats` and the ratio before / after.

    python benchmarks/eval_loss.py                       # small preset, 2 threads
    python benchmarks/eval_loss.py --threads 1 --clock cpu   # work done, robust on a loaded machine
    python benchmarks/eval_loss.py --preset demo --repeats 9 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polyglu import hardware  # noqa: E402
from polyglu.config import RunConfig  # noqa: E402
from polyglu.model.transformer import PolychromaticLM  # noqa: E402
from polyglu.train import loss as loss_module  # noqa: E402
from polyglu.train import trainer as trainer_module  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", type=int, default=2048, help="loss alone: rows of hidden states")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall time, or this process's CPU time (meaningful with --threads 1)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def gradient_forming_loss(hidden, weight, targets, chunk_size=2048):
    """What evaluation ran before: the Function, whose forward forms the gradients its inputs need."""
    return loss_module._ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                        targets.reshape(-1), chunk_size)


def interleaved(before, after, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    before(), after()  # warm-up
    times = {"before": [], "after": []}
    for _ in range(repeats):
        for name, fn in (("before", before), ("after", after)):
            start = clock()
            fn()
            times[name].append(clock() - start)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    return {"before_s": b, "after_s": a, "ratio": b / a}


class RandomTokens:
    def __init__(self, vocab, batch, seq_len):
        self.vocab, self.batch, self.seq_len = vocab, batch, seq_len

    def get_batch(self, step, micro_step=0):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                "doc_ids": torch.zeros(self.batch, self.seq_len, dtype=torch.long)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    config = RunConfig.load(None, [f"model.preset={args.preset}", f"data.seq_len={args.seq_len}",
                                   "train.eval_batches=2", "train.progress=false", f"train.threads={args.threads}",
                                   "train.dtype=float32"])
    model_config = config.model_config()
    head = torch.nn.Parameter(torch.randn(model_config.vocab_size, model_config.d_model) * 0.02)
    hidden = torch.randn(args.tokens, model_config.d_model)
    targets = torch.randint(0, model_config.vocab_size, (args.tokens,))

    def loss_before():
        with torch.no_grad():
            gradient_forming_loss(hidden, head, targets)

    def loss_after():
        with torch.no_grad():
            loss_module.chunked_cross_entropy_sum(hidden, head, targets)

    result = {"preset": args.preset, "threads": args.threads, "repeats": args.repeats, "clock": args.clock,
              "loss_alone": {"tokens": args.tokens, **interleaved(loss_before, loss_after, args.repeats, clock)}}

    with tempfile.TemporaryDirectory() as tmp:
        config.run_dir = tmp
        model = PolychromaticLM(model_config)
        data = RandomTokens(model_config.vocab_size, args.batch, args.seq_len)
        trainer = trainer_module.Trainer(config, model, data, data, log=lambda *a: None)
        real = trainer_module.chunked_cross_entropy_sum

        def evaluate_before():
            trainer_module.chunked_cross_entropy_sum = gradient_forming_loss
            try:
                trainer.evaluate()
            finally:
                trainer_module.chunked_cross_entropy_sum = real

        result["evaluate"] = {"batch": args.batch, "seq_len": args.seq_len, "eval_batches": 2,
                              **interleaved(evaluate_before, trainer.evaluate, args.repeats, clock)}
    result["environment"] = hardware.environment("cpu", "float32")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"environment: {hardware.describe_environment(result['environment'])}")
        for name in ("loss_alone", "evaluate"):
            r = result[name]
            print(f"{name:<11} before {r['before_s'] * 1e3:8.1f} ms  after {r['after_s'] * 1e3:8.1f} ms  "
                  f"before/after {r['ratio']:.2f}x  (median of {args.repeats}, {args.threads} threads, "
                  f"preset {args.preset}, {args.clock} clock)")
    return result


if __name__ == "__main__":
    main()
