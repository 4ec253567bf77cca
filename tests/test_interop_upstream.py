"""Import of original PolyGLU checkpoints: parity with the fixture's expected logits."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyglu
from polyglu.cli import main
from polyglu.interop.upstream import load_upstream
from polyglu.model_io import CheckpointError

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
pytestmark = pytest.mark.skipif(not (FIXTURES / "upstream_tiny.pt").exists(), reason="shared/fixtures not present")


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURES / "upstream_tiny_expected.safetensors"))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_convert_cli_reproduces_original_logits(tmp_path, expected, capsys):
    out = tmp_path / "model"
    assert main(["convert", "--from", "upstream", str(FIXTURES / "upstream_tiny.pt"), str(out)]) == 0
    model = polyglu.load_model(out)
    ref = json.loads((FIXTURES / "upstream_tiny.json").read_text())["config"]
    c = model.config
    assert (c.vocab_size, c.d_model, c.d_ff, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.max_seq_len) == (
        ref["vocab_size"], ref["d_model"], ref["d_ff"], ref["n_layers"], ref["n_q_heads"], ref["n_kv_heads"],
        ref["head_dim"], ref["seq_length"])
    assert c.routing_pool == "sequence" and model.tau == pytest.approx(0.37)
    meta = json.loads((out / "config.json").read_text())
    assert meta["converted_from"]["step"] == 123
    torch.testing.assert_close(_logits(model, expected["input_ids"]), expected["logits"], atol=1e-5, rtol=0)


def test_bare_state_dict_and_safetensors(tmp_path, expected):
    state = torch.load(FIXTURES / "upstream_tiny.pt", weights_only=True)["model"]
    torch.save(state, tmp_path / "bare.pt")
    save_file({k: v.contiguous() for k, v in state.items() if k != "output_head.weight"},
              str(tmp_path / "weights.safetensors"))
    for path in (tmp_path / "bare.pt", tmp_path / "weights.safetensors"):
        model, info = load_upstream(path, tau=0.37)
        torch.testing.assert_close(_logits(model, expected["input_ids"]), expected["logits"], atol=1e-5, rtol=0)
    model, _ = load_upstream(tmp_path / "bare.pt")
    assert model.tau == pytest.approx(0.1)  # no tau in a bare state dict: the end of the original schedule


def test_causal_pool_changes_semantics(tmp_path, expected):
    model, _ = load_upstream(FIXTURES / "upstream_tiny.pt", routing_pool="causal")
    logits = _logits(model, expected["input_ids"])
    assert not torch.allclose(logits, expected["logits"], atol=1e-4)


def test_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {"x": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_upstream(tmp_path / "evil.pt")


def test_foreign_checkpoint_errors(tmp_path, capsys):
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="'embeddings.weight' not found"):
        load_upstream(tmp_path / "x.pt")
    assert main(["convert", "--from", "upstream", str(tmp_path / "missing.pt"), str(tmp_path / "o")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


def test_convert_refuses_non_empty_output(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["convert", "--from", "upstream", str(FIXTURES / "upstream_tiny.pt"), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
