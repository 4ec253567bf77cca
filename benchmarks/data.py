"""Data pipeline cost: BPE tokenisation throughput, and the loader's cost per batch against a training step.

1. Tokenisation: the built-in math corpus (`--problems` training problems), a byte-level BPE trained on
   it (`--vocab-size`), then `prepare` with 1 and `--workers` processes: tokens/s end to end (reading
   JSONL, tokenising, writing shards and checksums), and the tokenizer's `encode_batch` alone.
2. Loader: `PackedLoader.get_batch` (memory-mapped windows, doc_ids) against one training step of the
   `debug` preset (forward, backward, AdamW) on the same batch shape, steps interleaved with loads so
   machine load hits both alike. Prints medians and the ratio loader / step (target: <= 2%).
   `--sft` adds `SFTDataset.get_batch` on the built-in chat pairs.

    python benchmarks/data.py                       # --threads 2 --workers 2
    python benchmarks/data.py --problems 5000 --steps 10 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=20_000, help="built-in training problems to tokenise")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2, help="tokenising processes for the parallel run")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (and loader batches between)")
    p.add_argument("--ffn", default="polyglu", help="the debug model's feed-forward kind (polyglu, swiglu, ...)")
    p.add_argument("--sft", action="store_true", help="also time SFTDataset.get_batch")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def tokenisation(args, root: Path) -> dict:
    from polyglu.data.prepare import prepare
    from polyglu.data.synthetic import write_builtin_math
    from polyglu.data.tokenizer import train_bpe_tokenizer

    paths = write_builtin_math(root / "text", n_train=args.problems, n_val=10, n_test=10)
    start = time.perf_counter()
    tok = train_bpe_tokenizer([paths["pretrain_train"]], args.vocab_size, root / "tok")
    train_s = time.perf_counter() - start
    texts = [json.loads(line)["text"] for line in paths["pretrain_train"].read_text().splitlines()]
    start = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    encode_s = time.perf_counter() - start
    out = {"documents": len(texts), "bpe_vocab": tok.vocab_size, "bpe_train_s": train_s,
           "encode_batch_tokens_per_s": n_tokens / encode_s, "chars_per_token": sum(map(len, texts)) / n_tokens}
    for workers in sorted({1, args.workers}):
        start = time.perf_counter()
        manifest = prepare([paths["pretrain_train"]], root / "tok", root / f"shards-{workers}", workers=workers)
        out[f"prepare_tokens_per_s_workers_{workers}"] = manifest["tokens"] / (time.perf_counter() - start)
        out["tokens"] = manifest["tokens"]
    return out | {"paths": paths, "tokenizer_dir": root / "tok", "shards": root / "shards-1"}


def loader_vs_step(args, data: dict) -> dict:
    import torch

    from polyglu import ModelConfig, PolychromaticLM
    from polyglu.data.chat import SFTDataset
    from polyglu.data.loader import PackedLoader
    from polyglu.data.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer(data["tokenizer_dir"])
    loader = PackedLoader(data["shards"], seq_len=args.seq_len, batch_size=args.batch, seed=0)
    sft = SFTDataset(data["paths"]["sft_train"], tok, args.seq_len, args.batch) if args.sft else None
    config = ModelConfig.from_preset("debug", vocab_size=max(512, tok.vocab_size), max_seq_len=args.seq_len,
                                     ffn=args.ffn)
    model = PolychromaticLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step(batch):
        logits = model(batch["input_ids"], batch["doc_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    load_s, sft_s, step_s = [], [], []
    train_step(loader.get_batch(0))  # warm-up
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        batch = loader.get_batch(step)
        load_s.append(time.perf_counter() - start)
        if sft is not None:
            start = time.perf_counter()
            sft.get_batch(step)
            sft_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        train_step(batch)
        step_s.append(time.perf_counter() - start)
    out = {"loader_ms": 1e3 * statistics.median(load_s), "debug_step_ms": 1e3 * statistics.median(step_s),
           "model_parameters": sum(p.numel() for p in model.parameters())}
    out["loader_share_of_step"] = out["loader_ms"] / out["debug_step_ms"]
    if sft_s:
        out["sft_loader_ms"] = 1e3 * statistics.median(sft_s)
        out["sft_share_of_step"] = out["sft_loader_ms"] / out["debug_step_ms"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = tokenisation(args, Path(tmp))
        timing = loader_vs_step(args, data)
    result = {k: v for k, v in data.items() if k not in ("paths", "tokenizer_dir", "shards")} | timing
    result["setting"] = {k: v for k, v in vars(args).items() if k != "json"}
    from polyglu import hardware

    result["environment"] = hardware.environment("cpu", "float32")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"environment: {hardware.describe_environment(result['environment'])}")
    print(f"built-in corpus: {result['documents']:,} documents, {result['tokens']:,} tokens, "
          f"BPE vocab {result['bpe_vocab']} trained in {result['bpe_train_s']:.1f}s, "
          f"{result['chars_per_token']:.2f} chars/token")
    print(f"tokenisation  encode_batch        {result['encode_batch_tokens_per_s']:>12,.0f} tokens/s")
    for key in sorted(k for k in result if k.startswith("prepare_tokens_per_s")):
        print(f"              prepare, {key.rsplit('_', 1)[-1]} worker(s) {result[key]:>12,.0f} tokens/s")
    print(f"loader        get_batch (B={args.batch}, T={args.seq_len})  {result['loader_ms']:8.3f} ms")
    if "sft_loader_ms" in result:
        print(f"              SFT get_batch             {result['sft_loader_ms']:8.3f} ms "
              f"({result['sft_share_of_step']:.2%} of a step)")
    print(f"debug model   train step ({args.ffn}, {result['model_parameters']:,} params, {args.threads} threads) "
          f"{result['debug_step_ms']:8.1f} ms")
    print(f"ratio         loader / step = {result['loader_share_of_step']:.2%} (target <= 2%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
