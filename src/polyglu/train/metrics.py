"""Run observability: metrics.jsonl (always), TensorBoard and Weights & Biases (opt-in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 wandb_project: str | None = None, config: dict | None = None) -> None:
        self.enabled = enabled
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
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
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
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


@torch.no_grad()
def routing_entropy_summary(model: torch.nn.Module, batch: dict[str, torch.Tensor], device) -> dict[str, list]:
    """Per-layer mean routing entropy as a fraction of ln K: static (softmax(alpha/tau)) and dynamic
    (the full deterministic routing on one training batch)."""
    from polyglu.analysis.stats import routing_entropy

    layers = model.polyglu_layers()
    if not layers:
        return {}
    was_training = model.training
    model.eval()
    ids = batch["input_ids"][:2].to(device)
    docs = batch["doc_ids"][:2].to(device)
    routing = model(ids, docs, return_routing=True, compute_logits=False).routing
    model.train(was_training)
    static, dynamic = [], []
    for ffn, g in zip(layers, [r for r in routing if r is not None]):
        static_g = torch.softmax(ffn.alpha.float() / ffn.tau.float(), -1)
        static.append(float(routing_entropy(static_g, normalized=True).mean()))
        dynamic.append(float(routing_entropy(g.float(), normalized=True).mean()))
    return {"static": [round(x, 6) for x in static], "dynamic": [round(x, 6) for x in dynamic]}
