"""polyglu perplexity MODEL_DIR --data SHARDS_DIR[,NAME=DIR...] [--window N] [--stride N] [--max-tokens N]
[--output FILE]

Perplexity per source (e.g. math / STEM / code) over token shard directories written by
`polyglu prepare`, with sliding windows; prints a table and the JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polyglu.commands.common import add_quiet_argument, progress_disabled
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
                   help="the token ending documents (default: the manifest's eos_id)")
    p.add_argument("--output", default=None, help="write the results JSON here")
    add_quiet_argument(p)


def check_arguments(args: argparse.Namespace) -> None:
    from polyglu.commands import CommandError
    from polyglu.commands.common import check_output_file, check_positive, json_with_keys

    check_positive(window=args.window, stride=args.stride, max_tokens=args.max_tokens, batch_size=args.batch_size)
    if args.window is not None and args.stride is not None and args.stride > args.window:
        raise CommandError(f"--stride {args.stride} must be at most --window {args.window}")
    check_output_file(args.output, "--output", inputs=(args.model, *data_paths(args.data), args.tokenizer),
                      previous=json_with_keys("model", "sources"))


def data_paths(spec: str) -> list[str]:
    """The directories `--data` names (NAME=DIR entries included)."""
    return [item.rpartition("=")[2] for item in spec.split(",") if item]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from polyglu import hardware
    from polyglu.atomic import atomic_write_text, strict_json
    from polyglu.commands import CommandError
    from polyglu.commands.common import inference_notice
    from polyglu.data.tokenizer import load_tokenizer
    from polyglu.eval.perplexity import open_sources, perplexity, shard_sources
    from polyglu.loading import TOKENIZER_SUBDIR, load_model, resolve_device

    check_arguments(args)
    sources = shard_sources([s for s in args.data.split(",") if s])
    if not sources:
        raise CommandError("--data names no shard directory")
    device = resolve_device(args.device)
    threads = hardware.apply_threads(None)
    precision = hardware.choose_precision(args.dtype, device, purpose="inference")
    inference_notice(f"{precision.describe()}; {threads.describe()}")
    model = load_model(args.model, device=device, dtype=precision.dtype)
    # the model's tokenizer, when it has one, must be the data's: byte shards scored by a BPE model are junk
    spec = args.tokenizer or (Path(args.model) / TOKENIZER_SUBDIR if (Path(args.model) / TOKENIZER_SUBDIR).is_dir()
                              else None)
    tokenizer = load_tokenizer(spec) if spec is not None else None
    opened = open_sources(sources, model, tokenizer)  # every source checked before any is scored
    results = {}
    for name, shards in opened.items():
        document_end = None if args.no_documents else (shards.eos_id if args.eos_id is None else args.eos_id)
        with tqdm(desc=f"perplexity {name}", unit="window", disable=progress_disabled(args)) as bar:
            results[name] = perplexity(model, shards.arrays, window=args.window, stride=args.stride,
                                       batch_size=args.batch_size, document_end=document_end,
                                       max_tokens=args.max_tokens, progress=bar.update)
        results[name].update(path=str(sources[name]), document_end=document_end)
    print(f"{'source':<20} {'tokens':>12} {'nll':>8} {'perplexity':>12}")
    for name, r in results.items():
        print(f"{name:<20} {r['tokens']:>12,} {r['nll']:>8.4f} {r['perplexity']:>12.3f}")
    report = {"model": str(args.model), "sources": results}
    text = strict_json(report)  # a NaN perplexity (non-finite logits) is null, valid for strict parsers
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return 0
