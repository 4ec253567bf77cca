"""polyglu analyze MODEL_DIR --data SHARDS_OR_JSONL[,...] --out DIR [--run RUN_DIR] [--max-tokens N]

Writes DIR/analysis.json, one PNG per figure and DIR/report.html (self-contained).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (config.json + model.safetensors)")
    p.add_argument("--data", default=None, metavar="[NAME=]PATH[,...]",
                   help="comma-separated datasets for dynamic routing: token shard directories (manifest.json + "
                        "shard-*.bin) or .jsonl/.txt files; NAME defaults to the file or directory name. "
                        "Without --data only static routing is analysed")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="training run: routing across its checkpoints and the curves in its metrics.jsonl")
    p.add_argument("--max-tokens", type=int, default=32_768, metavar="N", help="tokens per dataset (default 32768)")
    p.add_argument("--evolution-tokens", type=int, default=8_192, metavar="N",
                   help="tokens of the first dataset per checkpoint of --run (default 8192)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: the model's context, at most 1024)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward (default: as many as keep the routing weights under 1 GiB, at most 32)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for text data: 'byte', a directory or a Hugging Face name "
                        "(default: MODEL_DIR/tokenizer)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="model weights dtype (default auto: bfloat16 on CUDA with bf16, float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")


def parse_data_specs(spec: str | None) -> dict[str, str]:
    """'math=a/b,code.jsonl' -> {'math': 'a/b', 'code': 'code.jsonl'} (names unique)."""
    from pathlib import Path

    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or "/" in name:  # no NAME= prefix (a path may itself contain '=')
            name, path = "", item
        name = name or Path(path).stem or Path(path).name
        base, n = name, 2
        while name in out:
            name, n = f"{base}-{n}", n + 1
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:

    from pathlib import Path

    from polyglu.analysis.pipeline import analyze_to_directory, is_analysis_output
    from polyglu.commands import CommandError
    from polyglu.commands.common import check_not_an_input, check_output_directory, check_positive

    check_positive(max_tokens=args.max_tokens, evolution_tokens=args.evolution_tokens, seq_len=args.seq_len,
                   batch_size=args.batch_size)
    check_output_directory(args.out, "--out", empty=False)
    out = Path(args.out)
    foreign = [p.name for p in out.iterdir() if not is_analysis_output(p)] if out.is_dir() else []
    if foreign:  # the directory is replaced whole: only an earlier analysis may be in it
        raise CommandError(f"--out {out}: holds files analyze did not write ({', '.join(sorted(foreign)[:5])}); "
                           f"choose a new directory")
    check_not_an_input(out, "--out", (args.model, args.run, *parse_data_specs(args.data).values()))
    import sys

    from polyglu.atomic import output_lock

    with output_lock(out, lambda line: print(line, file=sys.stderr)):  # a second analyze into --out waits
        analyze_to_directory(args.model, parse_data_specs(args.data), args.out, run_dir=args.run,
                             max_tokens=args.max_tokens, evolution_tokens=args.evolution_tokens,
                             seq_len=args.seq_len, batch_size=args.batch_size, tokenizer=args.tokenizer,
                             text_field=args.text_field, device=args.device, dtype=args.dtype,
                             progress=False if args.quiet else None)
    return 0
