"""polyglu export-hf MODEL_DIR OUT_DIR [--dtype float32|bfloat16|float16]"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="polyglu model directory (config.json + model.safetensors)")
    p.add_argument("output", metavar="OUT_DIR",
                   help="directory to write: loadable with AutoModelForCausalLM(..., trust_remote_code=True), "
                        "polyglu not needed")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from polyglu.commands import CommandError
    from polyglu.commands.common import check_output_directory

    out = Path(args.output)
    check_output_directory(out, "OUT_DIR")
    try:
        import torch

        from polyglu.interop.hf_export import export_hf
    except ImportError as e:
        raise CommandError(f"export-hf needs the [hf] extra: {e}") from None
    from polyglu.atomic import output_lock

    dtype = getattr(torch, args.dtype) if args.dtype else None
    with output_lock(out, _stderr):  # a second export into OUT_DIR waits for this one, then replaces it whole
        export_hf(args.model, out, dtype=dtype)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}: {files}")
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)
