"""Checks the verbs share on their flags, run before any work so that a bad flag costs nothing; the
set-up the model-reading verbs share."""

from __future__ import annotations

import sys
from pathlib import Path


def load_inference_model(args):
    """(model, tokenizer) for a verb with `add_model_arguments` (generate, chat, eval, eval-math): CPU
    threads and dtype by what this machine computes fast (`polyglu.hardware`; POLYGLU_THREADS,
    --dtype), said in one line on stderr when it is a terminal (`inference_notice`)."""
    from polyglu import hardware
    from polyglu.loading import load_model_and_tokenizer

    threads = hardware.apply_threads(None)
    return load_model_and_tokenizer(args.model, args.tokenizer, device=args.device, dtype=args.dtype,
                                    log=lambda line: inference_notice(f"{line}; {threads.describe()}"))


def inference_notice(line: str) -> None:
    """The inference verbs' start-up line (dtype and threads chosen, and why) on stderr, for a person
    at a terminal only: piped or captured stderr keeps its contract of one line per error."""
    if sys.stderr.isatty():
        print(f"polyglu: {line}", file=sys.stderr)


def check_output_file(path: str | Path | None, flag: str) -> None:
    """Refuse an output file path that is a directory or lies under a file."""
    from polyglu.commands import CommandError

    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{flag} {target}: is a directory; expected a file path")
    _check_parents(target, flag)


def check_output_directory(path: str | Path, flag: str, empty: bool = True) -> None:
    """Refuse an output directory path that is a file, lies under a file, or (with `empty`) holds files."""
    from polyglu.commands import CommandError

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CommandError(f"{flag} {target}: is a file; expected a new directory")
    if empty and target.is_dir() and any(target.iterdir()):
        raise CommandError(f"{flag} {target}: exists and is not empty; choose a new output directory")
    _check_parents(target, flag)


def _check_parents(target: Path, flag: str) -> None:
    from polyglu.commands import CommandError

    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CommandError(f"{flag} {target}: its parent {parent} is a file; expected a directory")
            return


def check_compile_argument(value) -> None:
    """--compile's value, checked before any model loads (a one-line error naming the choices)."""
    from polyglu.commands import CommandError
    from polyglu.generation import check_compile

    try:
        check_compile(value)
    except ValueError as e:
        raise CommandError(f"--compile: {e}") from None


def add_compile_argument(p) -> None:
    """--compile [MODE]: decode through torch.compile (generate, eval-math, eval)."""
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="run each decoding step through torch.compile (a mode or backend name may follow); "
                        "compiling takes seconds to minutes per batch size, so it pays for long or many "
                        "generations (see docs/generation.md)")


def check_positive(**flags: int | float | None) -> None:
    """Each given flag (name with '_' for '-') must be None or > 0."""
    from polyglu.commands import CommandError

    for name, value in flags.items():
        if value is not None and not value > 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {value}")
