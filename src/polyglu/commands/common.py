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
    from polyglu.inference import check_compile

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


def check_device_argument(device: str | None) -> None:
    """--device names a device this machine has: one line otherwise (every verb, before any work).
    None, 'auto' and 'cpu' need no check; 'cuda' without CUDA is the common mistake."""
    from polyglu.commands import CommandError

    if device in (None, "auto", "cpu"):
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device!r}: not a device (expected cpu, cuda, cuda:N or auto)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
            raise CommandError(f"--device {device}: CUDA is not available ({why}); use --device cpu, "
                               f"or a CUDA build of torch on a machine with a GPU (README, Installation)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s) "
                               f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def add_quiet_argument(p) -> None:
    """--quiet: no progress bars (they show only on a terminal anyway)."""
    p.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")


def progress_disabled(args) -> bool | None:
    """tqdm's `disable`: True with --quiet, else None (tqdm hides the bar when stderr is not a terminal)."""
    return True if getattr(args, "quiet", False) else None


def default_max_new_tokens(context: int, prompt_tokens: int | None = None, cap: int = 256) -> int:
    """New tokens when --max-new-tokens is not given: at most `cap`, within the model context. With a
    known prompt, what is left after it; for prompts not yet known (chat turns, evaluations), half the
    context, leaving the other half to the prompt."""
    room = context - prompt_tokens if prompt_tokens is not None else context // 2
    return max(1, min(cap, room))


def progress_visible(args) -> bool:
    """Whether progress lines are shown: on a terminal and without --quiet (as the progress bars)."""
    import sys

    return not (getattr(args, "quiet", False) or getattr(args, "no_progress", False)) and sys.stderr.isatty()
