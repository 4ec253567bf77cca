"""polyglu convert --from upstream|qwen3 IN OUT_DIR"""

from __future__ import annotations

import argparse

from polyglu.model_config import ROUTING_POOLS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source_format", required=True, choices=["upstream", "qwen3"],
                   help="upstream: the original PolyGLU project's .pt / .safetensors; qwen3: a Hugging Face Qwen3 directory")
    p.add_argument("input", metavar="IN", help="checkpoint file or directory")
    p.add_argument("output", metavar="OUT_DIR", help="model directory to write (config.json + model.safetensors)")
    p.add_argument("--tau", type=float, default=None,
                   help="upstream: routing temperature when the file has none (default 0.1, the end of pre-training)")
    p.add_argument("--routing-pool", choices=ROUTING_POOLS, default=None,
                   help="upstream: routing pooling of the imported model (default: sequence, the original's)")
    p.add_argument("--ffn", choices=["swiglu", "polyglu"], default="polyglu",
                   help="qwen3: keep SwiGLU, or upcycle into PolyGLU routed to SiLU (same outputs)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from polyglu.atomic import atomic_directory
    from polyglu.commands import CommandError
    from polyglu.commands.common import check_output_directory

    out = Path(args.output)
    check_output_directory(out, "OUT_DIR")
    if args.source_format == "upstream":
        from polyglu.interop.upstream import load_upstream

        overrides = {"routing_pool": args.routing_pool} if args.routing_pool else {}
        model, info = load_upstream(args.input, tau=args.tau, **overrides)
    else:
        try:
            from polyglu.interop.qwen3 import load_qwen3
        except ImportError as e:
            raise CommandError(f"Qwen3 import needs the [hf] extra: {e}") from None
        model, info = load_qwen3(args.input, ffn=args.ffn)
    # built beside and renamed into place whole: an interrupted convert leaves no weights without a tokenizer
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, extra={"converted_from": info})
        if args.source_format == "qwen3":
            from polyglu.interop.qwen3 import copy_tokenizer_files

            copy_tokenizer_files(args.input, tmp)
    counts = model.num_parameters()
    print(f"wrote {out} ({counts['total']:,} parameters, routing_pool={model.config.routing_pool}, "
          f"tau={model.tau})")
    return 0
