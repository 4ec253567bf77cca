"""Training checkpoints: a model directory plus optimizer tensors and a JSON train state.

    run_dir/checkpoints/step-00000100/
        config.json, model.safetensors      # loadable with polyglu.load_model
        optimizer.safetensors               # AdamW moments (no pickle)
        train_state.json                    # step, tokens, tau, data position, RNG, config
        tokenizer/                          # when the run has one

A checkpoint is written in a hidden temporary directory, fsynced, then renamed into place: a crash
at any moment leaves either the complete checkpoint or none. Only `step-*` directories count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from polyglu.checkpoint import atomic_write_bytes, atomic_write_text, fsync_dir, save_model

STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "train_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], tokenizer_dir: str | Path | None = None, keep: int = 3) -> Path:
    from safetensors.torch import save

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, extra={"step": step})
    tensors, meta = optimizer_tensors(optimizer)
    atomic_write_bytes(tmp / "optimizer.safetensors", save(tensors))
    atomic_write_text(tmp / "optimizer.json", json.dumps(meta) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    atomic_write_text(tmp / "train_state.json", json.dumps(train_state, indent=2) + "\n")
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. end of a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(optimizer tensors, optimizer meta, train state) of a checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "train_state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    return tensors, meta, state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
