"""polyglu verify-data DIR [--tokenizer TOK] [--no-checksums] [--json]"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a directory written by `polyglu prepare`")
    p.add_argument("--tokenizer", metavar="TOK", help="also check that the data was prepared with this tokenizer")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of each shard")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the directory is sound; otherwise the error names the shard and offset (exit 2)."""
    from polyglu.data.shards import verify_prepared
    from polyglu.data.tokenizer import load_tokenizer

    identity = load_tokenizer(args.tokenizer).identity() if args.tokenizer else None
    summary = verify_prepared(args.directory, identity, checksums=not args.no_checksums)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for part in (summary, summary.get("validation")):
        if part:
            print(f"{part['directory']}: OK: {part['shards']} shard(s), {part['tokens']:,} tokens, "
                  f"{part['documents']:,} documents, {part['dtype']}, vocab {part['vocab_size']}")
    return 0
