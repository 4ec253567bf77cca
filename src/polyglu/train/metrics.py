"""Run observability: metrics.jsonl (always), TensorBoard and Weights & Biases (opt-in).

metrics.jsonl has one writer (MetricsWriter, appending a JSON object per logged step) and one reader
(read_metrics) that every consumer uses: the trainer truncating it on resume, the analysis curves,
the ablation tables.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

METRICS_NAME = "metrics.jsonl"
STEP_KEYS = ("step", "global_step", "train_step")  # the x axis, also of metrics logged by other tools


@dataclass
class MetricsLog:
    """The rows of a metrics.jsonl, one per step in step order. A step logged more than once (the
    steps a killed run logged after its last checkpoint, logged again by the resumed run, in files
    written before resumes truncated them) keeps its last row. Rows without a step key use their
    line number as the step."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    skipped_lines: int = 0  # not a JSON object (e.g. a line torn by a kill)
    duplicate_rows: int = 0  # replaced by a later row of the same step


def read_metrics(metrics: str | Path) -> MetricsLog:
    """Read a metrics.jsonl (the file, or a run directory holding one). A missing file is empty."""
    path = Path(metrics)
    if path.is_dir():
        path = path / METRICS_NAME
    log = MetricsLog(path)
    if not path.is_file():
        return log
    by_step: dict[float, dict[str, Any]] = {}
    with open(path, errors="replace") as f:
        for index, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                log.skipped_lines += 1
                continue
            if not isinstance(row, dict):
                log.skipped_lines += 1
                continue
            step = next((row[k] for k in STEP_KEYS if _is_number(row.get(k))), index)
            log.duplicate_rows += step in by_step
            by_step.pop(step, None)  # re-insert: the later row also takes the later position
            by_step[step] = row
    log.steps = sorted(by_step)
    log.rows = [by_step[s] for s in log.steps]
    return log


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Keep the rows of steps <= `step` (the resumed checkpoint's), one per step: the steps after it
    are trained, and logged, again. Rewritten atomically; returns the number of rows dropped."""
    from polyglu.atomic import atomic_write_text

    log = read_metrics(run_dir)
    if not log.path.is_file():
        return 0
    keep = [row for s, row in zip(log.steps, log.rows) if s <= step]
    dropped = len(log.rows) - len(keep) + log.duplicate_rows + log.skipped_lines
    if dropped:
        atomic_write_text(log.path, "".join(json.dumps(row) + "\n" for row in keep))
    return dropped


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 wandb_project: str | None = None, config: dict | None = None) -> None:
        self.enabled = enabled
        self.file = open(Path(run_dir) / METRICS_NAME, "a") if enabled else None  # noqa: SIM115
        self.tb = None
        self.wandb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(f"train.tensorboard=true needs the tensorboard package: {e}") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if enabled and wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(f"train.wandb_project is set but wandb is not installed: {e}") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: name the file (a write on a descriptor names none)
            raise OSError(e.errno, e.strerror, self.file.name) from e
        flat = {k: v for k, v in _flatten(row).items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in flat.items():
                self.tb.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(flat, step=row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, list):
            out.update({f"{key}/{i}": x for i, x in enumerate(v)})
        else:
            out[key] = v
    return out


# routing statistics read this many tokens of each of the first two rows of a batch: enough for a
# per-layer mean, small next to a training step
ROUTING_SAMPLE_TOKENS = 512


def routing_entropy_summary(model: torch.nn.Module, batch: dict[str, torch.Tensor], device,
                            autocast=contextlib.nullcontext) -> dict[str, list]:
    """Per-layer mean routing entropy as a fraction of ln K: static (softmax(alpha/tau)) and dynamic
    (the full deterministic routing on a sample of a training batch: two rows of up to
    ROUTING_SAMPLE_TOKENS tokens). Without autograd, under the trainer's `autocast`; each layer's
    routing weights are reduced to their mean entropy as the forward goes (one layer's weights alive
    at a time), and the values come to the host in one read."""
    from polyglu.model.routing import routing_entropy, static_routing

    layers = model.polyglu_layers()
    if not layers:
        return {}
    was_training = model.training
    model.eval()
    ids = batch["input_ids"][:2, :ROUTING_SAMPLE_TOKENS].to(device)
    docs = batch["doc_ids"][:2, :ROUTING_SAMPLE_TOKENS].to(device)

    def mean_entropy(g: torch.Tensor) -> torch.Tensor:
        return routing_entropy(g.float(), normalized=True).mean()

    try:
        with torch.no_grad(), autocast():
            routing = model(ids, docs, return_routing=True, compute_logits=False, reduce_routing=mean_entropy).routing
            static = [mean_entropy(static_routing(ffn)) for ffn in layers]
    finally:
        model.train(was_training)
    dynamic = [r for r in routing if r is not None]
    static_values, dynamic_values = torch.stack([torch.stack(static), torch.stack(dynamic)]).tolist()
    return {"static": [round(x, 6) for x in static_values], "dynamic": [round(x, 6) for x in dynamic_values]}
