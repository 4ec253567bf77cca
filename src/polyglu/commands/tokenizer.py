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
    train.add_argument("--out", required=True, metavar="DIR", help="output directory")
    train.add_argument("--text-field", default="text", help="text field of .jsonl/.json/.parquet rows")
    train.add_argument("--seed", type=int, default=0, help="built-in corpus seed")
    train.add_argument("--n-train", type=int, default=50_000, help="built-in corpus problems")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from polyglu.data.tokenizer import train_bpe_tokenizer

    if args.builtin:
        from polyglu.data.synthetic import write_builtin_math

        with tempfile.TemporaryDirectory() as tmp:
            paths = write_builtin_math(tmp, n_train=args.n_train, n_val=0, n_test=0, seed=args.seed)
            tok = train_bpe_tokenizer([paths["pretrain_train"]], args.vocab_size, args.out)
    else:
        tok = train_bpe_tokenizer(args.input, args.vocab_size, args.out, text_field=args.text_field)
    print(f"{args.out}: byte-level BPE, vocab {tok.vocab_size} (asked {args.vocab_size}), eos {tok.eos_id}, "
          f"pad {tok.pad_id}")
    return 0
