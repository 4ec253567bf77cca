"""polyglu perplexity MODEL_DIR --data SHARDS_DIR[,NAME=DIR...] [--window N] [--stride N] [--max-tokens N]
[--output FILE]

Perplexity per source (e.g. math / STEM / code) over token shard directories written by
`polyglu prepare`, with sliding windows; prints a table and the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polyglu.commands.generate import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="comma-separated shard directories, each optionally NAME=DIR; a directory whose "
                        "subdirectories hold manifests gives one source per subdirectory")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model context)")
    p.add_argument("--stride", type=int, default=None, help="tokens a window advances (default: half a window)")
    p.add_argument("--max-tokens", type=int, default=None, help="read at most N tokens per source")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--no-documents", action="store_true",
                   help="treat each shard as one stream (default: documents end at EOS)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="the token ending documents (default: the manifest's tokenizer eos_id, else the "
                        "model's, else its tokenizer's)")
    p.add_argument("--output", default=None, help="write the results JSON here")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from polyglu.checkpoint import load_model
    from polyglu.cli import CommandError
    from polyglu.commands.generate import load_model_and_tokenizer, resolve_device, torch_dtype
    from polyglu.eval.perplexity import perplexity, read_token_shards, shard_sources

    sources = shard_sources([s for s in args.data.split(",") if s])
    if not sources:
        raise CommandError("--data names no shard directory")
    loaded = {name: read_token_shards(path) for name, path in sources.items()}  # fail early on bad input
    model = load_model(args.model, device=resolve_device(args.device), dtype=torch_dtype(args.dtype))
    results = {}
    for name, (arrays, manifest) in loaded.items():
        named = manifest.get("tokenizer")
        named = named if isinstance(named, dict) else {}
        vocab = manifest.get("vocab_size") or named.get("vocab_size")
        document_end = None
        if not args.no_documents:
            document_end = next((e for e in (args.eos_id, named.get("eos_id"), manifest.get("eos_id"),
                                             model.config.eos_token_id) if e is not None), None)
            if document_end is None:
                document_end = load_model_and_tokenizer(args.model, args.tokenizer)[1].eos_id
        if isinstance(vocab, int) and vocab > model.config.vocab_size:
            raise CommandError(f"{sources[name]}: shards use a vocabulary of {vocab} tokens, the model has "
                               f"{model.config.vocab_size}")
        with tqdm(desc=f"perplexity {name}", unit="window", disable=None) as bar:
            results[name] = perplexity(model, arrays, window=args.window, stride=args.stride,
                                       batch_size=args.batch_size, document_end=document_end,
                                       max_tokens=args.max_tokens, progress=bar.update)
        results[name].update(path=str(sources[name]), document_end=document_end)
    print(f"{'source':<20} {'tokens':>12} {'nll':>8} {'perplexity':>12}")
    for name, r in results.items():
        print(f"{name:<20} {r['tokens']:>12,} {r['nll']:>8.4f} {r['perplexity']:>12.3f}")
    report = {"model": str(args.model), "sources": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0
