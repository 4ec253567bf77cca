"""Checks the verbs share on their flags, run before any work so that a bad flag costs nothing."""

from __future__ import annotations

import errno
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
