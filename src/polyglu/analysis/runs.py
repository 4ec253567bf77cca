"""A training run over time: routing across its checkpoints, and the curves in `metrics.jsonl`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from polyglu.analysis.stats import Batch, _sig, dynamic_routing_stats, static_routing_stats, summarize_layers
from polyglu.model_io import CONFIG_NAME, WEIGHTS_NAME
from polyglu.train.metrics import (
    METRICS_NAME,  # noqa: F401  (the name commands import from here)
    STEP_KEYS,
    read_metrics,
)

MAX_POINTS = 2000  # per training curve; longer series are strided (the last point kept)
SEARCH_DEPTH = 3


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def checkpoint_step(model_dir: str | Path) -> int | None:
    """The training step of a checkpoint: from config.json metadata or a `*.json` state file beside
    the weights (keys step / global_step / train_step, top level or under "train"), else the last
    number in the directory's name (or its parent's, for `.../step-100/model`)."""
    model_dir = Path(model_dir)
    for candidate in [model_dir / CONFIG_NAME, *sorted(model_dir.glob("*.json"))]:
        try:
            meta = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        for section in (meta, meta.get("train"), meta.get("state")):
            if isinstance(section, dict):
                for key in STEP_KEYS:
                    value = section.get(key)
                    if isinstance(value, int) and not isinstance(value, bool):
                        return value
    for name in (model_dir.name, model_dir.parent.name):
        numbers = re.findall(r"\d+", name)
        if numbers:
            return int(numbers[-1])
    return None


def _subdirs(root: Path, depth: int) -> list[Path]:
    """root and its non-hidden subdirectories down to `depth` levels, in name order."""
    out = [root]
    if depth > 0:
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                out.extend(_subdirs(child, depth - 1))
    return out


def find_checkpoints(run: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """Model directories of a run, sorted by step: [{"step", "path"}].

    `run` is a list of model directories, or a run directory searched three levels deep for
    subdirectories holding config.json + model.safetensors (the run directory itself counts too;
    hidden directories, such as a trainer's temporary `.tmp-step-*`, do not).
    Checkpoints whose step cannot be found sort last, in name order.
    """
    if isinstance(run, (str, Path)):
        root = Path(run)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: run directory not found")
        dirs = [p for p in _subdirs(root, SEARCH_DEPTH) if is_model_dir(p)]
        if not dirs:
            raise FileNotFoundError(f"{root}: no checkpoint directories ({CONFIG_NAME} + {WEIGHTS_NAME}) found "
                                    "in it or its subdirectories")
    else:
        dirs = [Path(p) for p in run]
        for p in dirs:
            if not is_model_dir(p):
                raise FileNotFoundError(f"{p}: not a model directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    seen, found = set(), []
    for p in dirs:
        key = p.resolve()
        if key in seen:  # e.g. a `latest` symlink
            continue
        seen.add(key)
        found.append({"step": checkpoint_step(p), "path": str(p)})
    found.sort(key=lambda c: (c["step"] is None, c["step"] or 0, c["path"]))
    return found


def checkpoint_evolution(run: str | Path | Sequence[str | Path], batches: Iterable[Batch] | None = None,
                         max_tokens: int | None = None, device: torch.device | str | None = None
                         ) -> dict[str, Any]:
    """Per checkpoint (sorted by step): static routing per layer and, with `batches` (re-iterable,
    e.g. a list), dynamic routing per layer, as per-layer summaries."""
    from polyglu.loading import load_model

    checkpoints = []
    for ckpt in find_checkpoints(run):
        model = load_model(ckpt["path"], device=device, eval_routing="soft")
        entry = {**ckpt, "static": summarize_layers(static_routing_stats(model))}
        if batches is not None:
            dynamic = dynamic_routing_stats(model, batches, max_tokens)
            entry["dynamic"] = summarize_layers(dynamic)
            entry["tokens"] = dynamic["tokens"]
        checkpoints.append(entry)
        del model
    return {"checkpoints": checkpoints}


def _flatten(value: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", out)


def training_curves(metrics: str | Path, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Every numeric series in a `metrics.jsonl` (a file, or a run directory holding one), read by
    `polyglu.train.metrics.read_metrics` (one row per step, the last logged winning).

    Lenient: unparseable lines are counted and skipped, nested values are flattened to dotted keys
    (`routing_entropy.dynamic.3`), non-finite values are dropped. The x axis is `step` when a row
    has one, else the row index. Returns {"path", "rows", "skipped_lines", "series": {key: {"step",
    "value"}}}, each series strided to at most `max_points` points.
    """
    log = read_metrics(metrics)
    if not log.path.is_file():
        raise FileNotFoundError(f"{log.path}: no such metrics file")
    series: dict[str, tuple[list[float], list[float]]] = {}
    for step, row in zip(log.steps, log.rows):
        flat: dict[str, float] = {}
        _flatten({k: v for k, v in row.items() if k not in STEP_KEYS}, "", flat)
        for key, value in flat.items():
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(value)
    out = {}
    for key, (xs, ys) in sorted(series.items()):
        stride = max(1, math.ceil(len(xs) / max_points))
        keep = list(range(0, len(xs), stride))
        if keep[-1] != len(xs) - 1:
            keep.append(len(xs) - 1)
        out[key] = {"step": [xs[i] for i in keep], "value": [_sig(ys[i]) for i in keep]}
        if stride > 1:
            out[key]["strided_from"] = len(xs)
    return {"path": str(log.path), "rows": len(log.rows), "skipped_lines": log.skipped_lines, "series": out}
