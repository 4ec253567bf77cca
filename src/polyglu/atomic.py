"""Atomic file and directory writes: a reader sees the old content or the complete new one, never a
part, whatever moment the writer is killed at.

    atomic_write_text(path, text)            # also atomic_write_bytes, atomic_write_json
    with atomic_directory(run_dir / "final") as tmp:
        save_model(model, tmp)                # write anything into tmp; on exit it replaces final/

A file is written to a hidden temporary name beside it, fsynced and renamed over the target; a
directory is built in a hidden temporary directory beside it, every file in it fsynced, then
renamed into place. Temporaries are created like ordinary files and directories (mode 0o666 / 0o777
less the umask), so results stay readable by whoever could read the directory before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any


def temporary_name(path: str | Path, suffix: str = "tmp") -> Path:
    """A hidden name beside `path`, unique to this process and call: `.<name>.<pid>-<random>.<suffix>`
    (so the leftovers of a killed writer of `shard-*` match `.shard-*.tmp`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{suffix}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temporary_name(path)
        try:
            # os.open applies the umask to 0o666, as open() does; mkstemp would leave the file 0o600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: name the file, not a descriptor
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinity (float, numpy or 0-d tensor scalar) replaced by None, so
    that it serialises as strictly valid JSON (`null`; Python would write bare `NaN`)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "ndim", None) == 0
                                    and hasattr(value, "item")):
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return number
    return value


def strict_json(value: Any, indent: int | None = 2, **kwargs: Any) -> str:
    """JSON that strict parsers accept: non-finite numbers become null (`finite_or_none`)."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """`value` as strict JSON (`strict_json`: indented, NaN as null, a final newline), written atomically."""
    atomic_write_text(path, strict_json(value, indent=indent) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename, a new file) durable; a no-op where that is unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under `path` (files written by code that does not fsync,
    such as a tokenizer's save_pretrained or shutil.copytree), deepest first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            file = os.path.join(root, name)
            if os.path.islink(file):
                continue
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


# renameat2(2) with RENAME_EXCHANGE swaps two paths in one step (Linux >= 3.15, glibc >= 2.28), so a
# directory is replaced with no moment at which neither the old nor the new one is in place.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@cache
def _renameat2():
    try:
        renameat2 = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths a and b; False where the platform or filesystem cannot."""
    renameat2 = _renameat2()
    return renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                               _RENAME_EXCHANGE) == 0


def replace_directory(source: str | Path, target: str | Path) -> None:
    """Rename the complete directory `source` to `target`, replacing a `target` that exists (its old
    content is deleted only once the new one is in place)."""
    source, target = Path(source), Path(target)
    if not target.exists():
        os.replace(source, target)
    elif _exchange(source, target):
        shutil.rmtree(source)  # now holds the old content
    else:
        # Without an atomic swap: move the old directory aside first. A crash between the two renames
        # leaves both complete directories under hidden names, nothing half-written.
        old = temporary_name(target, "old")
        os.replace(target, old)
        os.replace(source, target)
        fsync_dir(target.parent)
        shutil.rmtree(old)
    fsync_dir(target.parent)


@contextmanager
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `path` to write into. On a clean exit everything in
    it is fsynced and it is renamed to `path` (replacing an existing directory when `replace`, else
    FileExistsError before anything is written); on an exception it is removed and `path` is untouched.
    """
    path = Path(path)
    if not replace and path.exists():
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.mkdir(mode=0o777)  # the umask applies, as for any new directory
    try:
        yield tmp
        fsync_tree(tmp)
        if not replace and path.exists():
            raise FileExistsError(f"{path} already exists")
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# locks held, per thread (lock path -> depth): a writer that calls another writer of the same output
# (prepare_builtin_math -> prepare) takes the lock once
_HELD = threading.local()


@contextmanager
def output_lock(output: str | Path, log=None) -> Iterator[None]:
    """Hold an exclusive lock on `output` (a file or directory several processes may write) for the
    block: a lock file `.NAME.lock` beside it, flock-ed, so a killed holder frees it at once. A
    second writer waits for the first, saying whom it waits for, then sees its finished result."""
    import fcntl
    import socket

    output = Path(output)
    lock = output.with_name(f".{output.name}.lock")
    key = (os.getpid(), str(lock.resolve()))  # a forked child holds nothing of its parent's
    held = _HELD.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if log:
                log(f"{output} is being written by {holder}; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the previous holder unlinks the file on release: lock the file now at the path
            current = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)
