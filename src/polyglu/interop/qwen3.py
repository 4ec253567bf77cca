"""Import a Hugging Face Qwen3 checkpoint (config.json + safetensors) as a PolychromaticLM.

    model, info = load_qwen3("Qwen3-0.6B/", ffn="polyglu")   # or ffn="swiglu"

Qwen3's decoder is ours with SwiGLU: pre-norm RMSNorm, GQA with RMSNorm on q and k over head_dim
before rotate-half RoPE, no biases, optional tied head. Tensors map name for name; only config
values the model cannot express are refused (attention bias, sliding window, RoPE scaling, an
activation other than SiLU), each naming the key.

`ffn="polyglu"` upcycles: every FFN becomes a PolyGLU with the same projections and routing set so
that each neuron computes SiLU exactly (see `route_to_silu`), so logits equal Qwen3's. The routing
is then trained like any PolyGLU model, after opening it (docs/huggingface.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from polyglu.model.routing import static_routing
from polyglu.model_config import ModelConfig
from polyglu.model_io import CheckpointError, read_json_file

# other activations weigh exp(-margin / tau): exactly 0 in float32 (below ~1e-45) while tau <= 1.15,
# so a converted model computes SwiGLU bit for bit under softmax routing
EXACT_SILU_MARGIN = 120.0

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
}
# what a Hugging Face directory's tokenizer consists of (any subset)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
_GLOBAL_MAP = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "lm_head.weight"}


def read_qwen3_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    raw = read_json_file(path, "expected a Hugging Face Qwen3 directory")
    if raw.get("model_type") != "qwen3":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen3'")
    return raw


def qwen3_model_config(raw: dict[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
    """ModelConfig of a Qwen3 config.json dict; unsupported features raise CheckpointError naming the key."""

    def need(key: str) -> Any:
        if key not in raw:
            raise CheckpointError(f"{source}: key '{key}' missing")
        return raw[key]

    if raw.get("attention_bias", False):
        raise CheckpointError(f"{source}: attention_bias=true is not supported (PolychromaticLM has no attention biases)")
    if raw.get("use_sliding_window", False):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported (full attention only)")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise CheckpointError(f"{source}: layer_types {sorted(set(layer_types))} are not supported (full_attention only)")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (SiLU only)")
    # transformers 5 writes rope_parameters {rope_type, rope_theta}; older files rope_theta + rope_scaling
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{source}: RoPE scaling '{rope_type}' is not supported (plain RoPE only)")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10_000.0))
    n_heads = need("num_attention_heads")
    d_model = need("hidden_size")
    vocab_size = need("vocab_size")
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    pad = raw.get("pad_token_id")
    fields = dict(
        vocab_size=vocab_size, d_model=d_model, d_ff=need("intermediate_size"), n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or d_model // n_heads, max_seq_len=raw.get("max_position_embeddings", 32_768),
        rope_theta=float(rope_theta), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < vocab_size else None,
        eos_token_id=eos if isinstance(eos, int) and 0 <= eos < vocab_size else None,
        init_std=float(raw.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return ModelConfig.from_dict(fields)


def read_safetensors_dir(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""
    from polyglu.model_io import load_state_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors checkpoints are read)")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_state_file(hf_dir / shard))
    return state


def convert_qwen3_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, source: str = "checkpoint"
                             ) -> dict[str, torch.Tensor]:
    """Qwen3 tensor names -> PolychromaticLM names (projections and norms only; routing is separate)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key in _GLOBAL_MAP:
            if key == "lm_head.weight" and config.tie_embeddings:
                continue
            out[_GLOBAL_MAP[key]] = tensor
            continue
        parts = key.split(".", 3)  # model, layers, N, rest
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_MAP:
            out[f"layers.{parts[2]}.{_LAYER_MAP[parts[3]]}"] = tensor
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unrecognised tensors: {', '.join(unknown[:8])}"
                              + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    return out


@torch.no_grad()
def route_to_silu(model, margin: float = EXACT_SILU_MARGIN, zero_dynamic: bool = True) -> None:
    """Set every PolyGLU neuron's routing to prefer SiLU by `margin` logits.

    alpha[:, silu] = margin, other columns 0: each other activation weighs exp(-margin/tau) / Z.
    With the default (120) that is exactly 0 in float32 for tau <= 1.15: the layer computes SwiGLU
    exactly, and the softmax is saturated, so no gradient reaches the routing either. A small margin
    (e.g. 3: SiLU 87%, others 4% each at tau=1) opens the routing for training at the cost of a small
    change of function. `zero_dynamic` zeroes gate_net's last layer, so beta * gate_net(x) = 0 while
    beta stays 1 and gate_net's first layer keeps its (random) weights: the dynamic part starts at
    exactly zero but receives gradients as soon as the softmax is not saturated.
    """
    layers = model.polyglu_layers()
    if not layers:
        raise ValueError("the model has no PolyGLU layers (ffn is not 'polyglu')")
    for layer in layers:
        if "silu" not in layer.activations:
            raise ValueError(f"PolyGLU activations {layer.activations} do not include 'silu'")
        silu = layer.activations.index("silu")
        layer.alpha.zero_()
        layer.alpha[:, silu] = float(margin)
        if zero_dynamic:
            layer.beta.fill_(1.0)
            layer.gate_net[2].weight.zero_()
            layer.gate_net[2].bias.zero_()


def load_qwen3(hf_dir: str | Path, ffn: str = "polyglu", dtype: torch.dtype = torch.float32,
               silu_margin: float = EXACT_SILU_MARGIN, **overrides: Any):
    """Build a PolychromaticLM from a Hugging Face Qwen3 directory. Returns (model, info).

    ffn: "swiglu" keeps the FFN as it is; "polyglu" upcycles it with routing fixed on SiLU
    (`route_to_silu(model, silu_margin)`), same outputs. `overrides` set other ModelConfig fields
    (e.g. activations, gate_hidden, routing_pool, max_seq_len). Weights are cast to `dtype`.
    """
    from polyglu.model.transformer import PolychromaticLM
    from polyglu.model_io import check_state_dict

    if ffn not in ("polyglu", "swiglu"):
        raise ValueError(f"ffn must be 'polyglu' or 'swiglu', got {ffn!r}")
    hf_dir = Path(hf_dir)
    raw = read_qwen3_config(hf_dir)
    state = read_safetensors_dir(hf_dir)
    tied_in_file = "lm_head.weight" not in state or torch.equal(state["lm_head.weight"],
                                                                 state["model.embed_tokens.weight"])
    if raw.get("tie_word_embeddings", False) and not tied_in_file:
        # transformers unties in this case too: the file wins over the flag
        overrides.setdefault("tie_embeddings", False)
    if not raw.get("tie_word_embeddings", False) and "lm_head.weight" not in state:
        raise CheckpointError(f"{hf_dir}: tie_word_embeddings is false but lm_head.weight is missing")
    config = qwen3_model_config(raw, str(hf_dir / "config.json"), ffn=ffn, **overrides)
    converted = convert_qwen3_state_dict(state, config, str(hf_dir))
    with torch.device("cpu"):
        model = PolychromaticLM(config)
    # the routing tensors are not in a Qwen3 file: checked as the fresh model's, then set below
    routing = {k: v for k, v in model.state_dict().items()
               if ".ffn." in k and k.split(".ffn.")[1].startswith(("alpha", "beta", "tau", "gate_net.", "routing_map"))}
    check_state_dict(model, {**converted, **routing}, str(hf_dir))
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    if ffn == "polyglu":
        route_to_silu(model, silu_margin)
    model = model.to(dtype).eval()
    source_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    info = {"source": str(hf_dir), "format": "qwen3", "ffn": ffn, "tied_embeddings": config.tie_embeddings,
            "source_dtype": source_dtype}
    if ffn == "polyglu":
        info["silu_margin"] = silu_margin
        info["silu_weight_min"] = silu_weight(model)
    eos = raw.get("eos_token_id")
    if isinstance(eos, list) and len(eos) > 1:
        info["eos_token_ids"] = eos
    return model, info


@torch.no_grad()
def silu_weight(model) -> float:
    """The smallest routing weight on SiLU over all neurons at zero dynamic logits (1.0 = pure SwiGLU)."""
    lowest = 1.0
    for layer in model.polyglu_layers():
        silu = layer.activations.index("silu")
        weights = static_routing(layer)[:, silu]  # (F,)
        lowest = min(lowest, float(weights.min()))
    return lowest


def copy_tokenizer_files(hf_dir: str | Path, model_dir: str | Path) -> list[str]:
    """Copy a Hugging Face directory's tokenizer files into `model_dir/tokenizer/`, where polyglu
    (training with `init_from`, generate, export-hf) finds a model's tokenizer. Returns the names."""
    hf_dir, target = Path(hf_dir), Path(model_dir) / "tokenizer"
    names = [name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    if names:
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(hf_dir / name, target / name)
    return names
