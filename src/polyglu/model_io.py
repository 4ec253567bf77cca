"""The model-directory format: `config.json` + `model.safetensors`, written atomically, read without
pickle. `PolychromaticLM.from_pretrained` / `polyglu.load_model` build a model from one; training
checkpoints (`train/checkpointing.py`) are a model directory plus optimizer and train state.

config.json holds {"polyglu_format": 1, "model": {ModelConfig fields}, ...metadata}. The "model"
section is validated strictly (unknown keys are errors); other top-level keys are metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from polyglu.atomic import atomic_write_bytes, atomic_write_text
from polyglu.config import ConfigError, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model directory or checkpoint file is missing, unreadable or does not match its config."""


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model directory stores: persistent state, tied head omitted."""
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model: torch.nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `directory/model.safetensors` then `directory/config.json`, each atomically.

    Other files in the directory (a tokenizer, training state) are left alone.
    """
    return write_model_dir(model_state_dict(model), model.config, directory, extra)


def write_model_dir(state: dict[str, torch.Tensor], config, directory: str | Path,
                    extra: dict[str, Any] | None = None) -> Path:
    """A model directory from a full state dict (tied head omitted, model.safetensors then config.json,
    each atomically): `save_model` for a module, the trainer for weights gathered from FSDP shards."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if getattr(config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": "pt", "polyglu_format": "1"}))
    meta = {"polyglu_format": FORMAT_VERSION, "model": config.to_dict()}
    meta.update(extra or {})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return directory


def read_json_file(path: Path, expected: str) -> Any:
    """The JSON in `path`; a missing file or invalid JSON is a CheckpointError naming the file
    (`expected` says what should have been there)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({expected})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_model_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, metadata) of a model directory, with errors naming the file."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a model directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta = read_json_file(path, f"a model directory holds {CONFIG_NAME} + {WEIGHTS_NAME}")
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: no 'model' section (is this a polyglu model directory?)")
    try:
        config = ModelConfig.from_dict(meta["model"], where="model")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, meta


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected or mis-shaped tensor name."""
    expected = {k: tuple(v.shape) for k, v in model_state_dict(model).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs config {expected[k]}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatch: " + ", ".join(mismatched))
    if problems:
        raise CheckpointError(f"{source} does not match its config; " + "; ".join(problems))


