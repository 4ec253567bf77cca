"""benchmarks/peer.py builds a Hugging Face Qwen3 of exactly the polyglu preset's shape."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer  # noqa: E402

from polyglu.config import ModelConfig  # noqa: E402
from polyglu.interop.qwen3 import qwen3_model_config  # noqa: E402


@pytest.mark.parametrize("preset", ["small", "demo"])
def test_qwen3_peer_has_the_preset_shape(preset):
    ours = ModelConfig.from_preset(preset)
    qwen = peer.qwen3_config(ours)
    # read back through the Qwen3 importer: every size, RoPE, norm and tying setting agrees
    back = qwen3_model_config(qwen.to_dict())
    for field in ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len",
                  "rope_theta", "norm_eps", "tie_embeddings"):
        assert getattr(back, field) == getattr(ours, field), field
    assert qwen.eos_token_id is None  # decoding runs to the fixed token count


def test_peer_models_have_equal_swiglu_parameter_counts():
    args = peer.parse_args(["--preset", "debug", "--train-seq-len", "16"])
    models = peer.build_models(args)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts["qwen3"] == counts["swiglu"] < counts["polyglu"]


def test_lockstep_decode_shares_every_common_weight_and_times_each_step():
    args = peer.parse_args(["--preset", "debug", "--train-seq-len", "16"])
    models = peer.build_models(args)
    polyglu = models["polyglu"]
    seen = {}
    from polyglu import inference as generation

    class Recording(generation.DecodeStep):
        def __init__(self, model, compile=False):
            super().__init__(model, compile)
            seen[model.config.ffn] = model

    generation_step, generation.DecodeStep = generation.DecodeStep, Recording
    try:
        times = peer.lockstep_decode(models, torch.randint(1, 100, (1, 4)), steps=3, rounds=2, compiled=False)
    finally:
        generation.DecodeStep = generation_step
    assert {name: len(t) for name, t in times.items()} == {"polyglu": 6, "swiglu": 6}  # 3 steps x 2 rounds
    assert all(t > 0 for t in times["polyglu"] + times["swiglu"])
    swiglu_state, polyglu_state = seen["swiglu"].state_dict(), polyglu.state_dict()
    assert swiglu_state.keys() < polyglu_state.keys()  # PolyGLU adds only its routing tensors
    assert all(tensor.data_ptr() == polyglu_state[key].data_ptr() for key, tensor in swiglu_state.items())


def test_decode_compares_polyglu_with_a_swiglu_on_its_own_tensors(capsys):
    peer.main(["--preset", "debug", "--repeats", "1", "--new-tokens", "2", "--batch", "2", "--batch-new-tokens", "1",
               "--prompt-len", "4", "--skip-train", "--json"])
    import json

    results = json.loads(capsys.readouterr().out)["results"]
    for label in ("decode_batch1", "decode_batch2"):
        assert {"polyglu", "swiglu", "qwen3", "swiglu_shared"} <= results[label].keys(), label
    models = peer.build_models(peer.parse_args(["--preset", "debug", "--train-seq-len", "16"]))
    shared, own = peer.shared_swiglu(models["polyglu"]).state_dict(), models["polyglu"].state_dict()
    assert all(tensor.data_ptr() == own[key].data_ptr() for key, tensor in shared.items())
