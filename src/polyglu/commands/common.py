"""Checks the verbs share on their flags, run before any work so that a bad flag costs nothing; the
set-up the model-reading verbs share."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

# what to do about an OS error, by errno: the CLI prints it after the path and the system's words
OS_ERROR_ADVICE = {
    errno.ENOSPC: "free space on that device (or write elsewhere), then run the command again",
    errno.EDQUOT: "free space within your quota (or write elsewhere), then run the command again",
    errno.EFBIG: "the file exceeds the file-size limit (see `ulimit -f`) or the filesystem's largest file; "
                 "raise the limit or write elsewhere, then run the command again",
    errno.EACCES: "check the permissions of that path (or choose another one)",
    errno.EPERM: "check the permissions of that path (or choose another one)",
    errno.EROFS: "that filesystem is read-only: choose an output path on a writable one",
}
RESUMABLE_VERBS = ("train", "sft")

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


def os_error_line(error: OSError, verb: str) -> str:
    """One line for an OS error no check foresaw: the path, the system's words, what to do (and, for
    a training verb, that --resume continues from the last checkpoint)."""
    where = f"{error.filename}: " if error.filename else ""
    line = f"{where}{error.strerror or error}"
    advice = OS_ERROR_ADVICE.get(error.errno)
    if advice:
        line += f"; {advice}"
        if verb in RESUMABLE_VERBS:
            line += " with --resume (it continues from the last complete checkpoint)"
    return line


def check_utf8_arguments(argv: list[str]) -> None:
    """Arguments the terminal passed in another encoding than UTF-8 (Python keeps their bytes as
    surrogate escapes) are refused naming the argument, before anything reads them."""
    from polyglu.commands import CommandError

    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:
            name = argv[i - 1] if i > 0 and argv[i - 1].startswith("-") else f"argument {i + 1}"
            byte = ord(arg[e.start]) - 0xDC00 if 0xDC80 <= ord(arg[e.start]) <= 0xDCFF else ord(arg[e.start])
            raise CommandError(f"{name}: not valid UTF-8 (byte 0x{byte:02x} at character {e.start}); pass the "
                               f"text in UTF-8 (e.g. convert it with iconv -t UTF-8)") from None


def check_output_file(path: str | Path | None, flag: str, inputs: tuple = (), previous=None) -> None:
    """Refuse an output file path that is a directory or lies under a file; that is one of the verb's
    `inputs` (files or directories it reads) or an existing file inside one; or an existing file
    that `previous(path)` does not recognise as an earlier output of the verb (a file the verb did
    not write is never replaced)."""
    from polyglu.commands import CommandError

    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{flag} {target}: is a directory; expected a file path")
    _check_parents(target, flag)
    check_not_an_input(target, flag, inputs)
    if target.exists() and previous is not None and not previous(target):
        raise CommandError(f"{flag} {target}: exists and is not an earlier output of this command; it is never "
                           f"replaced: delete it or choose another path")


def check_not_an_input(target: Path, flag: str, inputs: tuple) -> None:
    """Refuse an output that is one of `inputs` or lies in an input directory (and already exists
    there, or is that directory): writing it would destroy what the command reads."""
    from polyglu.commands import CommandError

    resolved = target.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        if not source.exists():
            continue
        if resolved == source.resolve() or (target.exists() and target.samefile(source)):
            raise CommandError(f"{flag} {target}: is an input of this command ({source}); writing it would "
                               f"destroy it: choose another path")
        if source.is_dir() and source.resolve() in resolved.parents and (target.exists() or target.is_symlink()):
            raise CommandError(f"{flag} {target}: would replace a file inside the input {source}; choose a "
                               f"path outside it")


def json_with_keys(*keys: str, limit: int = 64 << 20):
    """A `previous` test for check_output_file: the file is a JSON object holding `keys` (what the
    verb writes), at most `limit` bytes."""
    import json

    def test(path: Path) -> bool:
        try:
            if path.stat().st_size > limit:
                return False
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(value, dict) and all(k in value for k in keys)

    return test


def jsonl_with_keys(*keys: str):
    """A `previous` test: an empty file, or one whose first line is a JSON object holding `keys`."""
    import json

    def test(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline(1 << 20)
            if not first.strip():
                return path.stat().st_size == 0
            value = json.loads(first)
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(value, dict) and all(k in value for k in keys)

    return test


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
