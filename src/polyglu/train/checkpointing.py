"""Training checkpoints: a model directory plus optimizer tensors and a JSON train state.

    run_dir/checkpoints/step-00000100/
        config.json, model.safetensors      # loadable with polyglu.load_model
        optimizer.safetensors               # AdamW moments (no pickle)
        train_state.json                    # step, tokens, tau, data position, RNG, config
        tokenizer/                          # when the run has one

Under FSDP2 (`train.distributed=fsdp`) the model and optimizer are sharded; the checkpoint holds
them through torch.distributed.checkpoint (DCP) instead of optimizer.safetensors, and still a full
model directory (gathered on rank 0) so `polyglu.load_model(step_dir)` works as before:

    run_dir/checkpoints/step-00000100/
        config.json, model.safetensors      # full weights, gathered (loadable with polyglu.load_model)
        dcp/                                # DCP: .metadata + one __<rank>_0.distcp per rank
                                            #   {"model": sharded state, "optimizer": sharded AdamW state}
        train_state.json                    # as above, plus "sharded": {"format": "dcp", "world_size": N}
        tokenizer/

A DCP checkpoint loads at any world size (DCP reshards), also in a single process. Its .metadata
and non-tensor optimizer values are pickled by DCP: load only checkpoints you trust.

A checkpoint is written in a hidden temporary directory, fsynced, then renamed into place: a crash
at any moment leaves either the complete checkpoint or none. Only `step-*` directories count. Under
FSDP every rank writes its shard into the temporary directory rank 0 created; after a barrier rank 0
renames it (a shared filesystem is assumed across nodes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from polyglu.atomic import atomic_write_bytes, atomic_write_text, fsync_dir, replace_directory
from polyglu.model_io import save_model, write_model_dir

STEP_DIR = re.compile(r"^step-(\d+)$")
DCP_DIR = "dcp"


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


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint directory `path` cannot be resumed from (`FILE: reason`), or None when every
    file reads: the JSON files parse, the safetensors headers are whole and match their file sizes.
    No tensor is loaded, so checking every checkpoint of a run costs milliseconds."""
    from polyglu.model_io import CheckpointError, read_json_file, read_safetensors_header

    path = Path(path)
    try:
        state = read_json_file(path / "train_state.json", "a checkpoint's train state")
        if not isinstance(state, dict) or not {"step", "tokens", "rng"} <= set(state):
            return f"{path / 'train_state.json'}: not a train state (no step, tokens or rng)"
        read_json_file(path / "config.json", "a checkpoint's model config")
        read_safetensors_header(path / "model.safetensors")
        if not is_sharded_checkpoint(path):
            read_safetensors_header(path / "optimizer.safetensors")
            read_json_file(path / "optimizer.json", "a checkpoint's optimizer settings")
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"{e.filename or path}: {e.strerror or e}"
    return None


def newest_intact_checkpoint(run_dir: str | Path, log=print) -> Path | None:
    """The newest checkpoint of `run_dir` that `checkpoint_problem` finds whole, naming (in `log`)
    each newer damaged one and the one taken instead; None when the run has no checkpoint. When
    every checkpoint is damaged, CheckpointError names the newest one's file and reason."""
    from polyglu.model_io import CheckpointError

    found = list_checkpoints(run_dir)
    damaged = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                log(f"checkpoint {damaged[0][0].name} is damaged ({damaged[0][1]}); resuming from the newest intact "
                    f"checkpoint, {path} (steps after it are trained again)")
            return path
        damaged.append((path, problem))
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: the newest is damaged "
                              f"({damaged[0][1]}); restore it from a backup, or start again with --overwrite")
    return None


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
    _publish(run_dir, tmp, final, keep)
    return final


def _publish(run_dir: str | Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename the complete temporary directory into place, then prune to the last `keep`."""
    replace_directory(tmp, final)  # re-saving a step (e.g. the end of a resumed run) swaps it whole
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- FSDP2: sharded checkpoints through torch.distributed.checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a possibly FSDP-sharded model, on CPU, on rank 0 only
    (other ranks get {}). Collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            train_state: dict[str, Any], dist, tokenizer_dir: str | Path | None = None,
                            keep: int = 3) -> Path:
    """Collective (every rank calls it): DCP shards of model + optimizer from every rank, and the
    gathered full model directory from rank 0, into rank 0's temporary directory; then rank 0
    renames it into place. `model` is the inner model (state-dict keys as in model.safetensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = None
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tmp = Path(dist.broadcast_object(str(tmp) if tmp is not None else None))  # after rank 0 made it
    model_state, optim_state = get_state_dict(model, optimizer)
    # each rank writes (and fsyncs) its own shard file; rank 0 writes .metadata once all have
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / DCP_DIR)
    full = full_model_state(model)  # collective all-gather, kept on rank 0's CPU
    if dist.is_main:
        write_model_dir(full, model.config, tmp, extra={"step": step})
        del full
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        state = dict(train_state, sharded={"format": "dcp", "world_size": dist.world_size})
        atomic_write_text(tmp / "train_state.json", json.dumps(state, indent=2) + "\n")
        fsync_dir(tmp / DCP_DIR)
        fsync_dir(tmp)
    dist.barrier()  # every shard is on disk before the rename makes the checkpoint visible
    if dist.is_main:
        _publish(run_dir, tmp, final, keep)
    dist.barrier()  # nobody looks for the latest checkpoint before the rename
    return final


def load_sharded_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint's model and optimizer state in place, resharding to the current world
    (any size; a plain process too). Collective under FSDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():
        if single:  # DCP warns that it "assumes" a single process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(path) / DCP_DIR, no_dist=single)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_train_state(path: str | Path) -> dict[str, Any]:
    from polyglu.model_io import read_json_file

    return read_json_file(Path(path) / "train_state.json", "a checkpoint's train state")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(optimizer tensors, optimizer meta, train state) of a (single-process) checkpoint directory."""
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
