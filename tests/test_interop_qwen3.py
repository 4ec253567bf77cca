"""Qwen3 import: random tiny Qwen3 models built offline with transformers, converted, compared."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from polyglu.cli import main  # noqa: E402
from polyglu.interop.qwen3 import (  # noqa: E402
    copy_tokenizer_files,
    load_qwen3,
    qwen3_model_config,
    route_to_silu,
)
from polyglu.loading import load_model  # noqa: E402
from polyglu.model_io import CheckpointError  # noqa: E402

VOCAB = 101


def _qwen3(tied: bool, **changes) -> Qwen3ForCausalLM:
    """head_dim (16) != hidden/heads (12), GQA 4:2, a non-default theta and eps, random norm weights."""
    torch.manual_seed(1)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.2,
                         eos_token_id=7, **changes)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen3_dir(request, tmp_path_factory):
    model = _qwen3(request.param)
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("ffn", ["swiglu", "polyglu"])
def test_logits_equal_qwen3(qwen3_dir, ffn):
    path, qwen = qwen3_dir
    model, info = load_qwen3(path, ffn=ffn)
    assert model.config.ffn == ffn and info["ffn"] == ffn
    assert model.config.tie_embeddings is qwen.config.tie_word_embeddings
    assert (model.config.head_dim, model.config.rope_theta, model.config.norm_eps) == (16, 500.0, 1e-5)
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        ours, theirs = model(ids).logits, qwen(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_polyglu_routing_is_exactly_silu(qwen3_dir):
    path, _ = qwen3_dir
    model, info = load_qwen3(path, ffn="polyglu")
    swiglu, _ = load_qwen3(path, ffn="swiglu")
    assert info["silu_weight_min"] == 1.0
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out = model(ids, return_routing=True)
        assert torch.equal(out.logits, swiglu(ids).logits)
    silu = model.config.activations.index("silu")
    for routing in out.routing:  # (B, T, d_ff, K): one-hot on SiLU, in float32
        assert torch.all(routing[..., silu] == 1.0)
        assert torch.count_nonzero(routing) == routing[..., silu].numel()


def test_routing_trains_after_opening(qwen3_dir):
    """Exact SiLU routing is saturated (no gradient); a small margin opens it, and the zeroed
    gate_net output layer still receives gradients through beta = 1."""
    path, _ = qwen3_dir
    ids = torch.randint(0, VOCAB, (2, 9))
    grads = {}
    for margin in (None, 3.0):
        model, _ = load_qwen3(path, ffn="polyglu")
        if margin is not None:
            route_to_silu(model, margin)
        model.train()
        model(ids).logits.logsumexp(-1).mean().backward()
        layer = model.polyglu_layers()[0]
        grads[margin] = (layer.alpha.grad.abs().max().item(), layer.gate_net[2].weight.grad.abs().max().item())
    assert grads[None] == (0.0, 0.0)
    assert grads[3.0][0] > 0 and grads[3.0][1] > 0


def test_generate_matches_qwen3(qwen3_dir):
    from polyglu.interop.transformers import PolychromaticForCausalLM

    path, qwen = qwen3_dir
    model, _ = load_qwen3(path, ffn="polyglu")
    ids = torch.randint(0, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = qwen.generate(ids, **kwargs)
    ours = PolychromaticForCausalLM.from_polyglu(model).generate(ids, **kwargs)
    assert torch.equal(ours, theirs)


def test_convert_cli_and_sharded_bfloat16_checkpoint(tmp_path):
    qwen = _qwen3(tied=False).to(torch.bfloat16)
    qwen.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    out = tmp_path / "converted"
    assert main(["convert", "--from", "qwen3", str(tmp_path / "hf"), str(out), "--ffn", "polyglu"]) == 0
    model = load_model(out)
    meta = json.loads((out / "config.json").read_text())
    assert meta["converted_from"]["format"] == "qwen3" and meta["converted_from"]["source_dtype"] == "bfloat16"
    assert model.config.eos_token_id == 7
    ids = torch.randint(0, VOCAB, (1, 11))
    # the bfloat16 weights, in float32 (re-loaded: casting the model back would keep bf16 RoPE tables)
    reference = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(ids).logits
        assert (model(ids).logits - theirs).abs().max().item() <= 1e-4
    # and on to a Hugging Face directory of the upcycled model
    from transformers import AutoModelForCausalLM

    assert main(["export-hf", str(out), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    with torch.no_grad():
        assert (exported(ids).logits - theirs).abs().max().item() <= 1e-4


BASE = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_qwen3_features_are_named(change, message):
    with pytest.raises(CheckpointError, match=message):
        qwen3_model_config({**BASE, **change})


def test_config_fields():
    config = qwen3_model_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                 "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "eos_token_id": [5, 6],
                                 "tie_word_embeddings": True})
    assert (config.rope_theta, config.max_seq_len, config.eos_token_id, config.tie_embeddings) == (1e6, 128, 5, True)
    assert qwen3_model_config({**BASE, "head_dim": None}).head_dim == 8  # hidden / heads
    assert qwen3_model_config({**BASE, "rope_theta": 2e4}).rope_theta == 2e4  # older config files


def test_not_a_qwen3_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        load_qwen3(tmp_path)


def test_copy_tokenizer_files(tmp_path):
    from polyglu.data.tokenizer import load_tokenizer
    from polyglu.interop.hf_export import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(str(tmp_path / "hf"))
    assert "tokenizer.json" in copy_tokenizer_files(tmp_path / "hf", tmp_path / "model")
    assert load_tokenizer(tmp_path / "model" / "tokenizer").encode("hi") == [104, 105]
    assert copy_tokenizer_files(tmp_path / "nothing", tmp_path / "other") == []
