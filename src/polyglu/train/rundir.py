"""A run directory holds one run, written by one trainer at a time.

    run_dir/
        .lock                       {"pid", "host", "started"}: held (flock) while a trainer works here
        run_config.json             the run's config (safe changes on resume update it)
        run_config_history.jsonl    one line per start / resume: step, time, changed keys (old, new)
        metrics.jsonl               one row per logged step (see train.metrics.read_metrics)
        checkpoints/step-XXXXXXXX/  complete checkpoints (see train.checkpointing)
        final/                      the finished model directory
        tensorboard/
        data/                       the built-in corpus: input, not a result (kept by --overwrite)

Starting a run where another run's results lie needs `--resume` (continue it; the config may change
only in keys that do not change its results) or `--overwrite` (move the old results aside, then
delete them). Every result directory is written under a hidden temporary name and renamed into
place (polyglu.atomic); what a killed trainer leaves behind (`.tmp-step-*`, `.trash-*`, atomic
temporaries `.NAME.PID-HEX.tmp|old`) is cleaned at the next start, while the lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from polyglu.atomic import atomic_write_text, fsync_dir
from polyglu.train.metrics import METRICS_NAME

LOCK_NAME = ".lock"
RUN_CONFIG_NAME = "run_config.json"
HISTORY_NAME = "run_config_history.jsonl"
RESULT_NAMES = (RUN_CONFIG_NAME, HISTORY_NAME, METRICS_NAME, "checkpoints", "final", "tensorboard")
# leftovers of a killed trainer: a checkpoint being written (.tmp-step-*), old results being deleted
# (.trash-*), and polyglu.atomic's temporaries: a file or directory being written (.NAME.PID-HEX.tmp)
# or an old directory moved aside while being replaced (.NAME.PID-HEX.old)
_LEFTOVER = re.compile(r"^\.(tmp-|trash-)|^\..+\.\d+-[0-9a-f]+\.(tmp|old)$")
_OLD = re.compile(r"^\.(?P<name>.+)\.\d+-[0-9a-f]+\.old$")

# keys a resume may change: they decide how often to log, evaluate and save, or how long to train,
# never what a step computes (max_steps stretches the schedules from the resumed step on)
SAFE_RESUME_KEYS = frozenset({
    "run_dir", "train.max_steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.routing_stats_every", "train.checkpoint_every", "train.checkpoint_minutes", "train.keep_checkpoints", "train.max_bad_steps",
    "train.threads", "train.progress", "train.tensorboard", "train.wandb_project",
    "train.activation_checkpointing", "train.loss_kernel", "train.vocab_pad_multiple",  # same loss, other kernel
})


class RunDirError(ValueError):
    """The run directory is in use or holds results this start would lose or mix; the message is
    one line naming the directory, the cause and the flag or action that resolves it."""


# ---- the lock


def _holder_text(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (its lock file is being written)"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started', '?')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: an flock on `run_dir/.lock` (released by the kernel
    when the holder dies) whose content names the holder. A lock file whose holder is gone (dead pid
    on this host, flock free) is stale and taken over with a message; one naming another host is
    never taken over (its process cannot be checked from here)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, log=print) -> None:
        if self._fd is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            # the holder may have released (and unlinked) the file between our open and flock
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file or not locked:
                break
            os.close(fd)
        holder = self._read(fd)
        try:
            if locked is False:
                raise RunDirError(f"{self.run_dir} is in use by another trainer ({_holder_text(holder)}; "
                                  f"lock {self.path}): wait for it to finish or stop it, or use another run_dir")
            host = socket.gethostname()
            if holder and holder.get("pid") != os.getpid():
                if holder.get("host") != host:
                    raise RunDirError(
                        f"{self.run_dir} is locked by {_holder_text(holder)} (another machine, so it cannot be "
                        f"checked from here): if that trainer has stopped, delete {self.path}")
                if locked is None and _pid_alive(int(holder.get("pid", -1))):  # no flock on this filesystem
                    raise RunDirError(f"{self.run_dir} is in use by another trainer ({_holder_text(holder)}; "
                                      f"lock {self.path}): wait for it to finish or stop it")
                log(f"{self.run_dir}: taking over a stale lock ({_holder_text(holder)}, no longer running)")
            content = json.dumps({"pid": os.getpid(), "host": host,
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, content.encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: the filesystem has no flock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            return None
        return True

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def release(self) -> None:
        if self._fd is None:
            return
        # unlink while still holding the flock: a waiter that opened the old file sees the inode
        # change and retries on a new file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the flock goes; the file stays, a stale lock for the next start


# ---- what the directory holds


def existing_results(run_dir: str | Path) -> list[str]:
    """The result entries of a run in `run_dir` (empty files and directories do not count)."""
    run_dir = Path(run_dir)
    found = []
    for name in RESULT_NAMES:
        path = run_dir / name
        if path.is_dir():
            if any(not p.name.startswith(".") for p in path.iterdir()):
                found.append(name + "/")
        elif path.is_file() and path.stat().st_size > 0:
            found.append(name)
    return found


def refuse_existing_results(run_dir: str | Path, overwrite: bool) -> list[str]:
    """Raise unless `run_dir` holds no run or `overwrite` is set; returns what it holds."""
    found = existing_results(run_dir)
    if found and set(found) <= {RUN_CONFIG_NAME, HISTORY_NAME}:
        # a start that stopped before its first logged step (say, a set-up error): nothing of a run to
        # keep, so the same command may simply be run again
        for name in found:
            (Path(run_dir) / name).unlink()
        return []
    if found and not overwrite:
        raise RunDirError(f"{run_dir} already holds a run ({', '.join(found)}): pass --resume to continue it "
                          f"or --overwrite to delete it and start again, or use another run_dir")
    return found


def clear_results(run_dir: str | Path, log=print) -> list[str]:
    """Move every result entry into a hidden trash directory (renames: nothing is half-deleted
    in place), then delete it. A kill in between leaves a `.trash-*` cleaned at the next start."""
    run_dir = Path(run_dir)
    found = existing_results(run_dir)
    if not found:
        return []
    trash = run_dir / f".trash-{os.getpid()}"
    trash.mkdir()
    for name in RESULT_NAMES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, trash / name)
    fsync_dir(run_dir)
    shutil.rmtree(trash)
    log(f"--overwrite: deleted the previous run's {', '.join(found)} in {run_dir}")
    return found


def clean_leftovers(run_dir: str | Path, log=print) -> list[str]:
    """Delete what killed trainers left: temporary checkpoint/final directories and trash; an old
    directory moved aside by an interrupted replacement goes back if its new version is missing.
    Call with the lock held (another live trainer's temporary directories look the same)."""
    run_dir = Path(run_dir)
    cleaned = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            if not _LEFTOVER.match(path.name) or path.is_symlink():
                continue
            old = _OLD.match(path.name)
            if old and path.is_dir() and not (parent / old["name"]).exists():
                os.replace(path, parent / old["name"])
                log(f"{run_dir}: restored {parent / old['name']} (its replacement was interrupted)")
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            cleaned.append(str(path.relative_to(run_dir)))
    if cleaned:
        log(f"{run_dir}: removed {len(cleaned)} left-over temporary file(s) of an interrupted run "
            f"({', '.join(cleaned)})")
    return cleaned


# ---- the run's config across resumes


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as {dotted field: value}: top-level keys, and the fields of the model, data and
    train sections (mapping values such as data.sources compare whole)."""
    out = {}
    for key, value in config.items():
        if key in ("model", "data", "train") and isinstance(value, dict):
            out.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            out[key] = value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _resolved_model(model: dict[str, Any]) -> dict[str, Any]:
    """A run config's model section as the full ModelConfig it builds (a preset and explicit
    fields that give the same model compare equal)."""
    from polyglu.config_loader import ConfigError
    from polyglu.model_config import ModelConfig

    try:
        config = ModelConfig.from_section(model)
    except ConfigError:
        return model
    return config.to_dict()


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two run configs: {key: (old, new)}. A field one side
    lacks (added to or removed from the config since) is no change."""
    old = _fields({**old, "model": _resolved_model(old.get("model", {}))})
    new = _fields({**new, "model": _resolved_model(new.get("model", {}))})
    return {key: (old[key], new[key]) for key in sorted(old.keys() & new.keys()) if old[key] != new[key]}


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())


# the global batch (rows per micro-step over all ranks, micro-steps per step) decides the data and
# the gradient of each step; per-process batch_size, grad_accum and tokens_per_step only spell it
# (W ranks with batch B read the rows one rank with batch W*B reads: see data.loader)
BATCH_KEYS = ("train.batch_size", "train.grad_accum", "train.tokens_per_step")


def global_batch(layout: dict[str, Any]) -> tuple[int, int]:
    """(rows per micro-step over all ranks, micro-steps per step) of {"world_size", "batch_size",
    "grad_accum"}."""
    return int(layout["world_size"]) * int(layout["batch_size"]), int(layout["grad_accum"])


def check_resume_config(old: dict[str, Any], new: dict[str, Any], run_dir: str | Path, source: str,
                        checkpoint: str | Path | None = None, old_layout: dict[str, Any] | None = None,
                        new_layout: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """The safe changes between the saved config (of `source`: a checkpoint, run_config.json) and
    the new one; raise RunDirError listing every change that would alter the run's results.
    With both batch layouts ({"world_size", "batch_size", "grad_accum"}) known, a batch_size,
    grad_accum, tokens_per_step or world-size change that keeps the global batch is safe; at
    another world size, one that keeps the rows per step (tokens_per_step) is accepted and recorded
    as a "global_batch" change (the steps from here read other rows)."""
    changes = config_changes(old, new)
    unsafe = {k: v for k, v in changes.items() if k not in SAFE_RESUME_KEYS and k not in BATCH_KEYS}
    batch_changes = {k: v for k, v in changes.items() if k in BATCH_KEYS}
    note = ""
    if old_layout is not None and new_layout is not None:
        before, after = global_batch(old_layout), global_batch(new_layout)
        new_world = old_layout["world_size"] != new_layout["world_size"]
        if new_world:
            changes["world_size"] = (old_layout["world_size"], new_layout["world_size"])
        if before != after and new_world and before[0] * before[1] == after[0] * after[1]:
            # fewer or more ranks than the run had, the same rows per step split otherwise (what
            # tokens_per_step does): the run goes on, but its steps read other rows from here on
            changes["global_batch"] = (f"{before[0]}x{before[1]}", f"{after[0]}x{after[1]}")
        elif before != after:
            unsafe.update(batch_changes)
            if new_world:
                unsafe["world_size"] = changes["world_size"]
            note = (f" (global batch {before[0]} rows x {before[1]} micro-steps -> {after[0]} x {after[1]}; keep "
                    f"batch_size x world_size, or at another world size the rows per step with tokens_per_step)")
    else:
        unsafe.update(batch_changes)
    if unsafe:
        fresh = f"start a new run (another run_dir) with init_from={checkpoint}" if checkpoint \
            else "start a new run with --overwrite or another run_dir"
        raise RunDirError(f"cannot resume {run_dir}: {format_changes(dict(sorted(unsafe.items())))} differ from "
                          f"{source}{note}, which would change the run's results; restore them, or {fresh}")
    return changes


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RunDirError(f"{path}: not valid JSON ({e}); delete it to resume without a config check, or "
                          f"use --overwrite") from None
    return data if isinstance(data, dict) else None


def record_start(run_dir: str | Path, config: dict[str, Any], event: str, step: int,
                 changes: dict[str, tuple[Any, Any]] | None = None, environment: dict[str, Any] | None = None) -> None:
    """run_config.json := `config`; one line appended to run_config_history.jsonl (whole file
    rewritten atomically) saying what started at which step, which keys changed and, as
    `environment`, what it runs with (dtype and threads chosen and why, CPU capability; the
    trainer's `hardware.run_record`)."""
    run_dir = Path(run_dir)
    history = run_dir / HISTORY_NAME
    entry = {"event": event, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "host": socket.gethostname(), "pid": os.getpid()}
    if changes:
        entry["changes"] = {k: {"old": old, "new": new} for k, (old, new) in changes.items()}
    if environment:
        entry["environment"] = environment
    previous = history.read_text() if history.is_file() else ""
    if previous and not previous.endswith("\n"):
        previous += "\n"
    atomic_write_text(history, previous + json.dumps(entry) + "\n")
    atomic_write_text(run_dir / RUN_CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def on_main(dist, action) -> Any:
    """Run `action()` on rank 0 only; a RunDirError it raises is raised on every rank (collective
    under torch.distributed, so no rank waits at a later barrier for a rank that stopped)."""
    result, error = None, None
    if dist.is_main:
        try:
            result = action()
        except RunDirError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    return result
