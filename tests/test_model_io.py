"""Model directories: bitwise round trip, atomic writes, mismatch reporting, no pickle."""

import json

import pytest
import torch

import polyglu
from polyglu import ModelConfig, PolychromaticLM
from polyglu.model_io import CheckpointError


def test_round_trip_is_bitwise(tiny_config, tmp_path):
    model = PolychromaticLM(tiny_config.replace(eval_routing="hard"))
    with torch.no_grad():
        for ffn in model.polyglu_layers():
            ffn.alpha.normal_()
    model.set_tau(0.3)
    model.save_pretrained(tmp_path / "m")
    loaded = polyglu.load_model(tmp_path / "m")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 9))
    model.eval()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]


def test_same_weights_give_the_same_bytes_in_every_process(tiny_config, tmp_path):
    """model.safetensors is a function of the weights: saved from two processes, byte-identical (a
    checksum or a diff of two runs' outputs means something). safetensors orders its metadata map by
    hash, afresh in each process, so the header carries one key."""
    import subprocess
    import sys

    from safetensors import safe_open

    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config)
    model.save_pretrained(tmp_path / "a")
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it
    code = (f"import polyglu; polyglu.load_model({str(tmp_path / 'a')!r}).save_pretrained({str(tmp_path / 'b')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_untied_head_is_saved(tiny_config, tmp_path):
    model = PolychromaticLM(tiny_config.replace(tie_embeddings=False))
    model.save_pretrained(tmp_path / "m")
    loaded = polyglu.load_model(tmp_path / "m")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight


def test_mismatched_tensors_are_listed(tiny_config, tmp_path):
    PolychromaticLM(tiny_config).save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m/config.json").read_text())
    meta["model"]["d_ff"] = 64
    meta["model"]["n_layers"] = 3
    (tmp_path / "m/config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        polyglu.load_model(tmp_path / "m")
    msg = str(err.value)
    assert "missing: layers.2." in msg and "layers.0.ffn.gate_proj.weight (48, 32) vs config (64, 32)" in msg


def test_unknown_config_key_in_model_dir(tiny_config, tmp_path):
    PolychromaticLM(tiny_config).save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m/config.json").read_text())
    meta["model"]["dropout"] = 0.1
    (tmp_path / "m/config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config.json: unknown config key 'model.dropout'"):
        polyglu.load_model(tmp_path / "m")


def test_missing_and_corrupt_files(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        polyglu.load_model(tmp_path / "nope")
    PolychromaticLM(tiny_config).save_pretrained(tmp_path / "m")
    (tmp_path / "m/model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        polyglu.load_model(tmp_path / "m")
    (tmp_path / "m/config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON at line 1"):
        polyglu.load_model(tmp_path / "m")


def test_save_keeps_other_files(tiny_config, tmp_path):
    d = tmp_path / "m"
    (d / "tokenizer").mkdir(parents=True)
    (d / "tokenizer/tok.json").write_text("{}")
    PolychromaticLM(tiny_config).save_pretrained(d)
    assert (d / "tokenizer/tok.json").exists()


def test_load_with_overrides_and_dtype(tiny_config, tmp_path):
    PolychromaticLM(tiny_config).save_pretrained(tmp_path / "m")
    model = polyglu.load_model(tmp_path / "m", dtype=torch.bfloat16, eval_routing="hard")
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.config.eval_routing == "hard"
    assert model(torch.randint(0, 97, (1, 4))).logits.dtype == torch.bfloat16
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config


def test_inference_loader_lays_weights_out_for_decoding(tmp_path):
    """load_model_and_tokenizer (what the inference verbs use) stores CPU float32 linear weights
    column-major: same logits as the model as saved."""
    from polyglu.loading import load_model_and_tokenizer

    torch.manual_seed(0)
    model = PolychromaticLM(ModelConfig.from_preset("debug")).eval()
    model.save_pretrained(tmp_path / "m")
    loaded, _ = load_model_and_tokenizer(tmp_path / "m", tokenizer="byte")
    assert not loaded.layers[0].ffn.down_proj.weight.is_contiguous()
    assert loaded.layers[0].ffn.down_proj.weight.t().is_contiguous()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
