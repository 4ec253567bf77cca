"""The model-directory format: `config.json` + `model.safetensors`, written atomically, read without
pickle. `PolychromaticLM.from_pretrained` / `polyglu.load_model` build a model from one; training
checkpoints (`train/checkpointing.py`) are a model directory plus optimizer and train state.

config.json holds {"polyglu_format": 1, "model": {ModelConfig fields}, ...metadata}. The "model"
section is validated strictly (unknown keys are errors); other top-level keys are metadata.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from polyglu.atomic import atomic_write_bytes, atomic_write_text
from polyglu.config_loader import ConfigError
from polyglu.model_config import ModelConfig

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
    # one metadata key (transformers wants "format": "pt"; the format version lives in config.json):
    # safetensors writes its metadata map in hash order, so two keys made the same weights come out as
    # different bytes from one process to the next
    atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
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


# the largest safetensors header read: a hostile length field must not allocate gigabytes
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, read from its header
    alone (no tensor is allocated), and checked: a length that fits the file, valid JSON, every
    tensor's byte range inside the data and the data exactly as long as the tensors need. Raises
    CheckpointError naming the file and what is wrong (truncated, garbage, ...)."""
    import struct

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes, shorter than its 8-byte header "
                                      f"length; truncated?)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a readable safetensors file (header length {length} does not fit the "
                                      f"file's {size} bytes; truncated or not safetensors)")
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not JSON; garbage or "
                              f"truncated)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - length
    end = 0
    for name, info in header.items():
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            itemsize = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a readable safetensors file (tensor {name!r} has a malformed "
                                  f"header entry)") from None
        if not 0 <= start <= stop <= data or stop - start != math.prod(shape) * itemsize:
            raise CheckpointError(f"{path}: not a readable safetensors file (tensor {name!r} of shape {tuple(shape)} "
                                  f"needs bytes {start}..{stop} of {data}; truncated or damaged)")
        end = max(end, stop)
    if end != data:
        raise CheckpointError(f"{path}: not a readable safetensors file ({data - end} bytes after the last tensor; "
                              f"damaged)")
    return header


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def check_header_shapes(header: dict[str, dict[str, Any]], expected: dict[str, tuple[int, ...]],
                        source: str) -> None:
    """The tensor names and shapes in a safetensors header against a model's (`expected`): a
    CheckpointError listing every missing, unexpected or mis-shaped tensor, raised before the model
    is built (a config.json naming a huge model beside small weights costs nothing)."""
    check_state_dict(None, {k: _Shape(v["shape"]) for k, v in header.items()}, source, expected=expected)


class _Shape:
    """Stands in for a tensor in check_state_dict: only `.shape` is read."""

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity (a model that would silently emit one token), naming
    the first such tensor and how many values are bad."""
    for name, tensor in state.items():
        # one float32 reduction per tensor (~15x cheaper than isfinite().all()); a sum that overflows
        # without any non-finite value is told apart by the exact test
        if (tensor.is_floating_point() and not math.isfinite(float(tensor.sum(dtype=torch.float32)))
                and not bool(torch.isfinite(tensor).all())):
            bad = int((~torch.isfinite(tensor)).sum())
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) ({kind}); "
                                  f"the weights are damaged (a diverged run?): use an earlier checkpoint")


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_state_dict(model: torch.nn.Module | None, state: dict[str, torch.Tensor], source: str,
                     expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Raise CheckpointError listing every missing, unexpected or mis-shaped tensor name (against
    `model`'s state, or the `expected` shapes)."""
    if expected is None:
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


