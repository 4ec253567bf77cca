"""Import checkpoints of the original PolyGLU project.

Accepted inputs: its "portable" `.pt` dict {"model": state_dict, "step", "tau"} (read with
`weights_only=True`, never unpickled), a bare state dict `.pt`, or a `.safetensors` file with the
same tensor names. The config is inferred from the tensor shapes; routing is set to the original,
non-causal "sequence" pooling so the imported model reproduces the original's outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from polyglu.model_config import ModelConfig
from polyglu.model_io import CheckpointError

# original activation order (ReLU, Tanh, SiLU, GELU)
UPSTREAM_ACTIVATIONS = ("relu", "tanh", "silu", "gelu")

_LAYER_MAP = {
    "rmsnorm_1.gama": "attn_norm.weight",
    "rmsnorm_2.gama": "ffn_norm.weight",
    "gqa.W_q.weight": "attn.q_proj.weight",
    "gqa.W_k.weight": "attn.k_proj.weight",
    "gqa.W_v.weight": "attn.v_proj.weight",
    "gqa.W_o.weight": "attn.o_proj.weight",
    "gqa.rmsnorm_q.gama": "attn.q_norm.weight",
    "gqa.rmsnorm_k.gama": "attn.k_norm.weight",
    "polyglu.W_gate.weight": "ffn.gate_proj.weight",
    "polyglu.W_up.weight": "ffn.up_proj.weight",
    "polyglu.W_down.weight": "ffn.down_proj.weight",
    "polyglu.alpha": "ffn.alpha",
    "polyglu.beta": "ffn.beta",
    "polyglu.gate_net.0.weight": "ffn.gate_net.0.weight",
    "polyglu.gate_net.0.bias": "ffn.gate_net.0.bias",
    "polyglu.gate_net.2.weight": "ffn.gate_net.2.weight",
    "polyglu.gate_net.2.bias": "ffn.gate_net.2.bias",
}
_GLOBAL_MAP = {"embeddings.weight": "embed_tokens.weight", "rmsnorm.gama": "norm.weight",
               "output_head.weight": "lm_head.weight"}
_IGNORED = ("rope.cosines", "rope.sins")


def read_upstream_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from an original checkpoint file, without unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from polyglu.model_io import load_state_file

        return load_state_file(path), {}
    if not _looks_like_torch_save(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither the zip archive `torch.save` writes nor "
                              f"a pickle; expected an original PolyGLU .pt or .safetensors file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read safely with weights_only=True ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors or {{'model': state_dict, ...}}, "
                              f"got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        meta = {k: v for k, v in obj.items() if k != "model"}
        state = obj["model"]
    else:
        meta, state = {}, obj
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries in the state dict: {', '.join(map(str, bad[:5]))}")
    # checkpoints saved from torch.compile'd modules carry an "_orig_mod." prefix
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    return state, meta


def _looks_like_torch_save(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle stream (protocol 2+ starts with 0x80)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


# rank of each tensor the config is inferred from: a wrong rank would otherwise fail as an unpacking error
_RANKS = {"embeddings.weight": 2, "model_core.0.gqa.rmsnorm_q.gama": 1, "model_core.0.gqa.W_q.weight": 2,
          "model_core.0.gqa.W_k.weight": 2, "model_core.0.polyglu.alpha": 2,
          "model_core.0.polyglu.gate_net.0.weight": 2, "rope.cosines": 2}


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint", **overrides: Any) -> ModelConfig:
    for key, rank in _RANKS.items():
        if key in state and state[key].dim() != rank:
            raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(state[key].shape)}, expected "
                                  f"{rank} dimension{'s' if rank > 1 else ''}")

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{source}: tensor '{key}' not found; is this an original PolyGLU checkpoint?")
        return state[key]

    vocab_size, d_model = need("embeddings.weight").shape
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"model_core\.(\d+)\.", k))}
    if not layer_ids:
        raise CheckpointError(f"{source}: no 'model_core.N.*' tensors found")
    n_layers = max(layer_ids) + 1
    head_dim = need("model_core.0.gqa.rmsnorm_q.gama").shape[0]
    n_heads = need("model_core.0.gqa.W_q.weight").shape[0] // head_dim
    n_kv_heads = need("model_core.0.gqa.W_k.weight").shape[0] // head_dim
    d_ff, n_act = need("model_core.0.polyglu.alpha").shape
    gate_hidden = need("model_core.0.polyglu.gate_net.0.weight").shape[0]
    max_seq_len = state["rope.cosines"].shape[0] if "rope.cosines" in state else 4096
    tied = "output_head.weight" not in state or state["output_head.weight"].data_ptr() == \
        state["embeddings.weight"].data_ptr() or torch.equal(state["output_head.weight"], state["embeddings.weight"])
    if n_act != len(UPSTREAM_ACTIVATIONS):
        raise CheckpointError(f"{source}: alpha has {n_act} activations; the original uses "
                              f"{len(UPSTREAM_ACTIVATIONS)} ({', '.join(UPSTREAM_ACTIVATIONS)})")
    fields = dict(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=n_heads,
                  n_kv_heads=n_kv_heads, head_dim=head_dim, max_seq_len=max_seq_len, rope_theta=10_000.0,
                  norm_eps=1e-6, tie_embeddings=tied, ffn="polyglu", activations=UPSTREAM_ACTIVATIONS,
                  gate_hidden=gate_hidden, routing_pool="sequence")
    fields.update(overrides)
    return ModelConfig.from_dict(fields)


def convert_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, source: str = "checkpoint"
                       ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key in _IGNORED:
            continue
        if key in _GLOBAL_MAP:
            new = _GLOBAL_MAP[key]
            if new == "lm_head.weight" and config.tie_embeddings:
                continue
            out[new] = tensor
            continue
        m = re.match(r"model_core\.(\d+)\.(.+)$", key)
        if m and m.group(2) in _LAYER_MAP:
            out[f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unrecognised tensors: {', '.join(unknown[:8])}"
                              + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    return {k: v.float().contiguous() for k, v in out.items()}


def load_upstream(path: str | Path, tau: float | None = None, **overrides: Any):
    """Build a PolychromaticLM from an original checkpoint. Returns (model, metadata).

    tau: routing temperature; read from the file when it carries one, else 0.1 (the end of the
    original pre-training schedule) unless given.
    """
    from polyglu.model.transformer import PolychromaticLM
    from polyglu.model_io import check_state_dict

    state, meta = read_upstream_file(path)
    if tau is None:
        tau = float(meta["tau"]) if "tau" in meta else 0.1
    config = infer_config(state, str(path), tau=tau, **overrides)
    converted = convert_state_dict(state, config, str(path))
    model = PolychromaticLM(config)
    check_state_dict(model, {**converted, **{k: v for k, v in model.state_dict().items() if k.endswith(".tau")}},
                     str(path))
    model.load_state_dict(converted, strict=False)
    model.set_tau(tau)
    model.eval()
    info = {"source": str(path), "format": "upstream", "tau": tau}
    if "step" in meta:
        info["step"] = int(meta["step"])
    return model, info
