"""polyglu analyze MODEL_DIR --data SHARDS_OR_JSONL[,...] --out DIR [--run RUN_DIR] [--max-tokens N]

Writes DIR/analysis.json, one PNG per figure and DIR/report.html (self-contained).
"""

from __future__ import annotations

import argparse

ROUTING_MEMORY_BUDGET = 1 << 30  # bytes of routing weights one forward may return (all layers)


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
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights dtype")


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
    import json
    from pathlib import Path

    import torch

    from polyglu.analysis import analyze_model, checkpoint_evolution, load_token_batches, training_curves
    from polyglu.analysis.plots import render_plots
    from polyglu.analysis.report import findings, render_report
    from polyglu.analysis.runs import METRICS_NAME, find_checkpoints
    from polyglu.cli import CommandError
    from polyglu.loading import load_model

    for flag, value in (("--max-tokens", args.max_tokens), ("--evolution-tokens", args.evolution_tokens),
                        ("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            raise CommandError(f"{flag} must be a positive integer, got {value}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"--out {args.out}: is a file; expected a directory")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    # soft routing whatever the saved eval mode: hard one-hot weights would have zero entropy
    model = load_model(args.model, device=device, dtype=dtype, eval_routing="soft")
    config = model.config
    seq_len = args.seq_len or min(config.max_seq_len, 1024)
    if seq_len > config.max_seq_len:
        raise CommandError(f"--seq-len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    per_row = seq_len * config.d_ff * config.n_activations * 4 * config.n_layers
    batch_size = args.batch_size or max(1, min(32, ROUTING_MEMORY_BUDGET // per_row))

    specs = parse_data_specs(args.data)
    tokenizer = None
    # the model's tokenizer tokenises text data and must be the one token shards were prepared with
    tok_spec = args.tokenizer or Path(args.model) / "tokenizer"
    if args.tokenizer is not None or Path(tok_spec).is_dir():
        from polyglu.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_spec)
    elif any(Path(p).is_file() for p in specs.values()):
        raise CommandError(f"text data needs a tokenizer: {tok_spec} does not exist; pass --tokenizer")
    datasets = {}
    for name, path in specs.items():
        datasets[name] = load_token_batches(path, seq_len, batch_size, args.max_tokens, tokenizer=tokenizer,
                                            eos_id=config.eos_token_id, vocab_size=config.vocab_size,
                                            text_field=args.text_field)
        n_tokens = sum(ids.numel() for ids, _ in datasets[name])
        print(f"{name}: {n_tokens:,} tokens from {path}")

    analysis = analyze_model(model, datasets, args.max_tokens)
    analysis["source"] = {"model": str(args.model), "data": specs, "seq_len": seq_len, "device": device,
                          "dtype": args.dtype}
    del model
    if args.run:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise CommandError(f"--run {run_dir}: not a directory")
        try:
            checkpoints = find_checkpoints(run_dir)
        except FileNotFoundError:
            checkpoints = []
        if checkpoints:
            first = next(iter(datasets.values()), None)
            print(f"evolution: {len(checkpoints)} checkpoints in {run_dir}")
            analysis["evolution"] = checkpoint_evolution(run_dir, first, args.evolution_tokens, device=device)
        if (run_dir / METRICS_NAME).is_file():
            analysis["training"] = training_curves(run_dir / METRICS_NAME)
        if not checkpoints and "training" not in analysis:
            raise CommandError(f"--run {run_dir}: neither checkpoints nor {METRICS_NAME} found")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(analysis) + "\n")
    figures = render_plots(analysis, out)
    report = render_report(analysis, figures, out / "report.html")
    for line in findings(analysis):
        print(f"  {line}")
    print(f"wrote {out / 'analysis.json'}, {len(figures)} figures, {report}")
    return 0
