"""polyglu prepare (--builtin math | --input FILE[,FILE...] | --hf NAME) --tokenizer TOK --out DIR"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--builtin", choices=["math"], help="the built-in corpus: generated math word problems "
                        "(pre-training text, SFT chats and a test set under DIR/text/)")
    source.add_argument("--input", metavar="FILE[,FILE...]", help="local .txt, .jsonl, .json or .parquet files")
    source.add_argument("--hf", metavar="NAME", help="a Hugging Face dataset name (or a builder: json, parquet, text)")
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="'byte', a tokenizer directory, or a Hugging Face tokenizer name (e.g. qwen3)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for shards and manifest.json")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.json/.parquet rows and HF examples")
    p.add_argument("--validation", metavar="FILE[,FILE...]", help="held-out sources, prepared into DIR/validation")
    p.add_argument("--hf-config", help="dataset configuration name")
    p.add_argument("--hf-split", default="train", help="dataset split (default: train)")
    p.add_argument("--hf-data-files", metavar="FILE[,FILE...]", help="data files for a builder such as json")
    p.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (EOS included)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 16M)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tokenising processes")
    p.add_argument("--force", action="store_true", help="overwrite a directory prepared from different inputs")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bar (shown only on a terminal anyway)")
    builtin = p.add_argument_group("built-in corpus")
    builtin.add_argument("--n-train", type=int, default=50_000, help="training problems (default 50000)")
    builtin.add_argument("--n-val", type=int, default=1_000, help="validation problems (default 1000)")
    builtin.add_argument("--n-test", type=int, default=1_000, help="test problems (default 1000)")
    builtin.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from polyglu.commands.common import check_positive, progress_visible
    from polyglu.data.prepare import DEFAULT_SHARD_TOKENS, prepare, prepare_builtin_math
    from polyglu.data.sources import HFSource

    check_positive(max_tokens=args.max_tokens, shard_tokens=args.shard_tokens, workers=args.workers)
    if args.builtin:
        check_positive(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    common = dict(max_tokens=args.max_tokens, workers=args.workers, progress=progress_visible(args),
                  force=args.force)
    if args.builtin:
        manifest = prepare_builtin_math(args.tokenizer, args.out, n_train=args.n_train, n_val=args.n_val,
                                        n_test=args.n_test, seed=args.seed, **common)
    else:
        if args.hf:
            files = tuple(args.hf_data_files.split(",")) if args.hf_data_files else None
            sources = [HFSource(args.hf, args.hf_config, args.hf_split, files, args.streaming)]
        else:
            sources = args.input
        manifest = prepare(sources, args.tokenizer, args.out, text_field=args.text_field,
                           validation=args.validation, shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
                           **common)
    print(f"{args.out}: {manifest['tokens']:,} tokens, {manifest['documents']:,} documents in "
          f"{len(manifest['shards'])} shard(s) ({manifest['dtype']}, vocab {manifest['vocab_size']}, "
          f"tokenizer {manifest['tokenizer']['name']})")
    if "builtin" in manifest:
        for name, path in manifest["builtin"]["files"].items():
            print(f"  {name:<20} {os.path.join(args.out, path)}")
    return 0
