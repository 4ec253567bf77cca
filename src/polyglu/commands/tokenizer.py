"""polyglu tokenizer train (--input FILE[,FILE...] | --builtin math) --vocab-size N --out DIR"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE (digits split one by one) with `tokenizers`",
                           description="Train a byte-level BPE on local text into a directory loadable by "
                           "AutoTokenizer.from_pretrained; special tokens <|endoftext|> (EOS), <|im_start|>, "
                           "<|im_end|>, <|pad|>.")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE[,FILE...]", help="local .txt, .jsonl, .json or .parquet files")
    source.add_argument("--builtin", choices=["math"], help="train on the built-in math corpus")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    train.add_argument("--force", action="store_true",
                       help="replace a non-empty --out (the new tokenizer is built beside it and swapped in whole)")
    train.add_argument("--text-field", default="text", help="text field of .jsonl/.json/.parquet rows")
    train.add_argument("--seed", type=int, default=0, help="built-in corpus seed")
    train.add_argument("--n-train", type=int, default=50_000, help="built-in corpus problems")


def run(args: argparse.Namespace) -> int:
    import sys
    import tempfile
    from pathlib import Path

    from polyglu.atomic import atomic_directory, output_lock
    from polyglu.commands import CommandError
    from polyglu.commands.common import check_output_directory
    from polyglu.data.tokenizer import train_bpe_tokenizer

    out = Path(args.out)
    check_output_directory(out, "--out", empty=False)
    inputs = [Path(p) for p in (args.input or "").split(",") if p]
    inside = [str(p) for p in inputs if out.resolve() == p.resolve() or out.resolve() in p.resolve().parents]
    if inside:
        raise CommandError(f"--out {out}: holds the input {inside[0]}, which replacing it would delete; choose "
                           f"another --out")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CommandError(f"--out {out}: exists and is not empty (a tokenizer a model may depend on?); pass "
                           f"--force to replace it or choose a new directory")
    # trained into a directory beside --out and swapped in whole: an interrupted run leaves the old one;
    # a second tokenizer train into --out waits for this one (output_lock), then replaces it whole
    with output_lock(out, lambda line: print(line, file=sys.stderr)), atomic_directory(out) as tmp:
        if args.builtin:
            from polyglu.data.synthetic import write_builtin_math

            with tempfile.TemporaryDirectory() as text:
                paths = write_builtin_math(text, n_train=args.n_train, n_val=0, n_test=0, seed=args.seed)
                tok = train_bpe_tokenizer([paths["pretrain_train"]], args.vocab_size, tmp)
        else:
            tok = train_bpe_tokenizer(args.input, args.vocab_size, tmp, text_field=args.text_field)
    print(f"{args.out}: byte-level BPE, vocab {tok.vocab_size} (asked {args.vocab_size}), eos {tok.eos_id}, "
          f"pad {tok.pad_id}")
    return 0
