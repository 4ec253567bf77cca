"""Loading a model (and its tokenizer) from a model directory: the library's entry point for every
verb and adapter that reads a trained model (generate, chat, eval, eval-math, perplexity, the
lm-evaluation-harness adapter).

    model = load_model("runs/demo/final", device="cuda", dtype=torch.bfloat16)
    model, tokenizer = load_model_and_tokenizer("runs/demo/final", device="auto", dtype="bfloat16")

Errors are library errors (CheckpointError, ValueError), which the CLI prints as one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from polyglu import hardware
from polyglu.data.special_tokens import IM_END
from polyglu.data.tokenizer import load_tokenizer
from polyglu.model.transformer import PolychromaticLM
from polyglu.model_io import CheckpointError, read_model_config

TOKENIZER_SUBDIR = "tokenizer"


def load_model(directory: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, **overrides: Any) -> PolychromaticLM:
    """Load a PolychromaticLM from a model directory. `overrides` change config fields that do not
    affect tensor shapes (e.g. eval_routing, mixed_impl, routing_pool)."""
    return PolychromaticLM.from_pretrained(directory, device=device, dtype=dtype, **overrides)


def resolve_device(device: str | None) -> str:
    """'auto' or None -> cuda when available, else cpu; anything else as given."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_dtype(name):
    """'bfloat16' -> torch.bfloat16; None, 'auto' (as stored) and torch dtypes pass through."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(dtypes)})")
    return dtypes[name]


def load_model_and_tokenizer(model_dir: str | Path, tokenizer=None, *, device: str | None = None,
                             dtype=None, log: Callable[[str], Any] | None = None):
    """(model in eval mode, tokenizer) from a model directory. The tokenizer is `tokenizer` (an object,
    or a spec for `load_tokenizer`), else MODEL_DIR/tokenizer, else the one named in config.json.

    `dtype`: a torch dtype, a name, or "auto"/None: what this device computes fast for inference
    (`hardware.choose_precision(..., purpose="inference")`: bfloat16 on CUDA with bf16, float32 on
    CPU); `log` gets one line saying what was chosen and why.

    The model is for inference: on CPU in float32 its linear weights are stored column-major
    (`PolychromaticLM.use_decode_layout`), which batch-1 decoding reads ~1.3x faster."""
    device = resolve_device(device)
    if not isinstance(dtype, torch.dtype):
        precision = hardware.choose_precision(dtype, device, purpose="inference")
        dtype = precision.dtype
        if log is not None:
            log(precision.describe())
    model = load_model(model_dir, device=device, dtype=dtype)
    model.use_decode_layout()
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        spec = tokenizer
        if spec is None and (Path(model_dir) / TOKENIZER_SUBDIR).is_dir():
            spec = Path(model_dir) / TOKENIZER_SUBDIR
        if spec is None:
            _, meta = read_model_config(model_dir)
            named = meta.get("tokenizer")
            spec = named.get("name") if isinstance(named, dict) else named
        if spec is None:
            raise CheckpointError(f"{model_dir} has no {TOKENIZER_SUBDIR}/ directory and names no tokenizer; "
                                  f"pass --tokenizer byte|DIR|NAME")
        tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer {getattr(tokenizer, 'name', '?')} has {tokenizer.vocab_size} tokens but "
                              f"the model's vocabulary is {model.config.vocab_size}")
    return model, tokenizer


def chat_stop_ids(tokenizer) -> list[int]:
    """EOS and <|im_end|> (when the tokenizer has it): the tokens that end an assistant turn."""
    ids = [tokenizer.eos_id]
    im_end = tokenizer.token_id(IM_END)
    if im_end is not None:
        ids.append(im_end)
    return ids
