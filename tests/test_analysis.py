"""Routing analysis: statistics on hand-built models with known routing, data readers, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from polyglu.analysis import (
    RoutingAccumulator,
    analyze_model,
    checkpoint_evolution,
    compare_domains,
    dynamic_routing_stats,
    find_checkpoints,
    load_token_batches,
    routing_entropy,
    static_routing,
    static_routing_stats,
    training_curves,
)
from polyglu.config import ModelConfig
from polyglu.model.transformer import PolychromaticLM

RELU, TANH, SILU, GELU = range(4)  # the default activation order
TOKEN_A, TOKEN_B = 1, 2


def _one_hot(index, k=4):
    return torch.nn.functional.one_hot(torch.as_tensor(index), k).float()


# ---- the entropy function


def test_entropy_edge_cases():
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(routing_entropy(uniform), torch.full((3,), math.log(4)))
    torch.testing.assert_close(routing_entropy(uniform, normalized=True), torch.ones(3))
    one_hot = _one_hot([0, 2, 3])
    assert torch.equal(routing_entropy(one_hot), torch.zeros(3))  # 0 log 0 = 0, no NaN
    assert torch.equal(routing_entropy(one_hot, normalized=True), torch.zeros(3))
    assert torch.equal(routing_entropy(torch.ones(5, 1), normalized=True), torch.zeros(5))  # K = 1
    half = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert routing_entropy(half, normalized=True).item() == pytest.approx(0.5)


# ---- static and dynamic routing on hand-built models


def _tanh_model(config, beta_zero=True, strength=8.0):
    model = PolychromaticLM(config).eval()
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.zero_()
            layer.alpha[:, TANH] = strength
            if beta_zero:
                layer.beta.zero_()
    return model


def test_static_routing_is_what_the_model_routes_with_alpha_alone(tiny_config):
    """static_routing (the one softmax(alpha / tau), used by analysis, training metrics and the Qwen3
    converter) equals the routing a static-mode model applies at every token."""
    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config.replace(routing_mode="static", tau=0.7)).eval()
    layer = model.polyglu_layers()[0]
    with torch.no_grad():
        layer.alpha.normal_(0.0, 2.0)
    expected = torch.softmax(layer.alpha.detach() / 0.7, dim=-1)  # (F, K)
    torch.testing.assert_close(static_routing(layer), expected)
    routing = model(torch.randint(0, tiny_config.vocab_size, (2, 5)), return_routing=True).routing[0]
    torch.testing.assert_close(routing, static_routing(layer).expand_as(routing))


def test_static_routing_every_neuron_prefers_tanh(tiny_config):
    stats = static_routing_stats(_tanh_model(tiny_config))
    p = math.exp(8) / (math.exp(8) + 3)  # softmax confidence of tanh
    expected_entropy = -(p * math.log(p) + 3 * ((1 - p) / 3) * math.log((1 - p) / 3)) / math.log(4)
    assert len(stats["layers"]) == tiny_config.n_layers
    for layer in stats["layers"]:
        assert layer["dominant"] == "tanh"
        assert set(layer["neuron_preferred"]) == {TANH}
        assert layer["preferred_shares"] == [0.0, 1.0, 0.0, 0.0]
        assert layer["entropy"] == pytest.approx(expected_entropy, rel=1e-4)
        assert layer["neuron_confidence"][0] == pytest.approx(p, rel=1e-3)
        assert layer["shares"][TANH] == pytest.approx(p, rel=1e-5)
        assert sum(layer["entropy_histogram"]["counts"]) == tiny_config.d_ff
        assert layer["entropy_histogram"]["counts"][0] == tiny_config.d_ff  # all in the lowest bin


def test_beta_zero_dynamic_equals_static(tiny_config):
    model = PolychromaticLM(tiny_config)
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.normal_(0, 2.0)
            layer.beta.zero_()
    batches = [torch.randint(0, tiny_config.vocab_size, (2, 16)) for _ in range(3)]
    static = static_routing_stats(model)
    dynamic = dynamic_routing_stats(model, batches)
    assert dynamic["tokens"] == 3 * 2 * 16
    for s, d in zip(static["layers"], dynamic["layers"]):
        assert d["tokens"] == 96
        assert d["neuron_preferred"] == s["neuron_preferred"]
        assert d["entropy"] == pytest.approx(s["entropy"], rel=1e-4)
        np.testing.assert_allclose(d["neuron_entropy"], s["neuron_entropy"], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(d["shares"], s["shares"], rtol=1e-4)
        # routing never changes with the input: all of its variance is between neurons
        fractions = d["variance"]["fractions"]
        assert fractions["between_neurons"] == pytest.approx(1.0, abs=1e-4)
        assert fractions["between_inputs"] == pytest.approx(0.0, abs=1e-4)
        assert d["neuron_consistency"] == pytest.approx(1.0)


def test_constant_routing_has_no_variance_fractions(tiny_config):
    model = _tanh_model(tiny_config)
    dynamic = dynamic_routing_stats(model, [torch.randint(0, 97, (2, 8))])
    for layer in dynamic["layers"]:
        assert layer["dominant"] == "tanh"
        assert layer["variance"]["fractions"] is None  # same weights for every neuron and input
        assert layer["agreement"] == pytest.approx(1.0)
        assert layer["majority_shares"] == [0.0, 1.0, 0.0, 0.0]


def _flip_model(tiny_config, pool):
    """One layer whose routing depends only on the input: rows of token A route every neuron to
    ReLU, rows of token B to GELU (alpha = 0, so static routing is uniform)."""
    model = PolychromaticLM(tiny_config.replace(n_layers=1, routing_pool=pool)).eval()
    layer = model.polyglu_layers()[0]
    with torch.no_grad():
        model.layers[0].attn.o_proj.weight.zero_()  # the FFN sees the (normalised) embedding alone
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[TOKEN_A, 0] = 5.0
        model.embed_tokens.weight[TOKEN_B, 1] = 5.0
        first, second = layer.gate_net[0], layer.gate_net[2]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 0] = 1.0  # hidden unit 0 sees token A, unit 1 token B
        first.weight[1, 1] = 1.0
        second.weight.zero_()
        second.bias.zero_()
        second.weight[RELU, 0] = 3.0
        second.weight[GELU, 1] = 3.0
    return model


@pytest.mark.parametrize("pool", ["causal", "sequence", "token"])
def test_routing_that_flips_with_the_input(tiny_config, pool):
    model = _flip_model(tiny_config, pool)
    rows_a = torch.full((2, 12), TOKEN_A)
    rows_b = torch.full((2, 12), TOKEN_B)
    analysis = analyze_model(model, {"A": [rows_a], "B": [rows_b], "AB": [torch.cat([rows_a, rows_b])]})
    static = analysis["static"]["layers"][0]
    assert static["entropy"] == pytest.approx(1.0)  # alpha = 0: a uniform mix
    a, b, ab = (analysis["dynamic"][name]["layers"][0] for name in ("A", "B", "AB"))
    assert a["dominant"] == "relu" and b["dominant"] == "gelu"
    assert a["entropy"] < 0.01 and b["entropy"] < 0.01
    # on mixed data the whole layer switches with the input: variance is between inputs
    assert ab["tokens"] == 48
    np.testing.assert_allclose(ab["pick_shares"], [0.5, 0.0, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(ab["majority_shares"], [0.5, 0.0, 0.0, 0.5], atol=1e-6)
    assert ab["variance"]["fractions"]["between_inputs"] == pytest.approx(1.0, abs=1e-3)
    assert ab["variance"]["fractions"]["between_neurons"] == pytest.approx(0.0, abs=1e-3)
    assert ab["agreement"] == pytest.approx(1.0)
    assert ab["neuron_consistency"] == pytest.approx(0.5)
    # domain comparison against the first dataset
    comparison = analysis["domain_comparison"]
    assert comparison["reference"] == "A" and comparison["domains"] == ["A", "B", "AB"]
    pair = comparison["pairs"][0]["layers"][0]
    assert pair["preferred_changed"] == pytest.approx(1.0)
    assert pair["share_diff"][RELU] == pytest.approx(-1.0, abs=1e-3)
    assert pair["share_diff"][GELU] == pytest.approx(1.0, abs=1e-3)
    json.dumps(analysis, allow_nan=False)  # plain JSON


def test_baseline_model_has_nothing_routed(tiny_config, tmp_path):
    from polyglu.analysis.plots import render_plots
    from polyglu.analysis.report import findings

    model = PolychromaticLM(tiny_config.replace(ffn="swiglu"))
    analysis = analyze_model(model, {"a": [torch.randint(0, 97, (1, 8))], "b": [torch.randint(0, 97, (1, 8))]})
    assert analysis["static"]["layers"] == [] and analysis["dynamic"]["a"]["layers"] == []
    assert findings(analysis) == ["The model has no PolyGLU layers: nothing is routed."]
    assert render_plots(json.loads(json.dumps(analysis)), tmp_path) == {}


def test_accumulator_variance_decomposition():
    # g[s, n]: 2 inputs x 2 neurons, one-hot over K = 2
    cases = {
        "between_neurons": [[0, 1], [0, 1]],  # neurons differ, inputs do not
        "between_inputs": [[0, 0], [1, 1]],  # each input switches the whole layer
        "interaction": [[0, 1], [1, 0]],  # neuron-specific reactions to the input
    }
    for expected, picks in cases.items():
        acc = RoutingAccumulator(d_ff=2, n_activations=2)
        acc.update(_one_hot(picks, 2)[:, None])  # (S=2, T'=1, F=2, K=2)
        fractions = acc.result(["relu", "tanh"])["variance"]["fractions"]
        assert fractions[expected] == pytest.approx(1.0), (expected, fractions)


def test_accumulator_streams_and_weights_tokens():
    g = torch.softmax(torch.randn(3, 5, 6, 4), dim=-1)
    whole, parts = RoutingAccumulator(6, 4), RoutingAccumulator(6, 4)
    whole.update(g)
    parts.update(g[:1])
    parts.update(g[1:])
    names = ["relu", "tanh", "silu", "gelu"]
    a, b = whole.result(names), parts.result(names)
    for key in ("entropy", "shares", "pick_shares", "agreement", "neuron_entropy", "neuron_confidence"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert a["neuron_preferred"] == b["neuron_preferred"]
    assert a["variance"]["fractions"] == pytest.approx(b["variance"]["fractions"], rel=1e-5)
    # a row routed once for its 10 tokens weighs as much as 10 positions with the same weights
    once, per_token = RoutingAccumulator(6, 4), RoutingAccumulator(6, 4)
    once.update(g[:, :1], weight=10)
    per_token.update(g[:, :1].expand(3, 10, 6, 4))
    a, b = once.result(names), per_token.result(names)
    assert a["tokens"] == b["tokens"] == 30
    assert a["entropy"] == pytest.approx(b["entropy"])
    assert a["variance"]["fractions"] == pytest.approx(b["variance"]["fractions"], rel=1e-5)


def test_compare_domains_requires_known_reference():
    with pytest.raises(ValueError, match="reference"):
        compare_domains({"a": {"layers": []}}, reference="b")


# ---- runs: checkpoints and metrics


def _save_checkpoints(tiny_config, run_dir):
    """Checkpoints whose tanh preference grows with the step; names in the trainer's style."""
    for step, name in [(10, "step-000010"), (2, "step-000002"), (5, "ckpt-5")]:
        _tanh_model(tiny_config, strength=step / 2).save_pretrained(run_dir / "checkpoints" / name)
    _tanh_model(tiny_config, strength=6.0).save_pretrained(run_dir / "final", extra={"step": 12})


def test_checkpoint_evolution(tiny_config, run_dir):
    _save_checkpoints(tiny_config, run_dir)
    found = find_checkpoints(run_dir)
    assert [c["step"] for c in found] == [2, 5, 10, 12]
    assert [c["step"] for c in find_checkpoints([c["path"] for c in reversed(found)])] == [2, 5, 10, 12]
    evolution = checkpoint_evolution(run_dir, [torch.randint(0, 97, (1, 8))])
    entropies = [c["static"][0]["entropy"] for c in evolution["checkpoints"]]
    assert entropies == sorted(entropies, reverse=True)  # strength grows with the step
    assert all(c["dynamic"][0]["dominant"] == "tanh" for c in evolution["checkpoints"])
    (run_dir / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoints(run_dir / "empty")


def test_training_curves_are_lenient(run_dir):
    rows = [
        {"step": 1, "loss": 5.0, "lr": 1e-4, "tau": 1.0, "routing_entropy": {"static": [0.9, 0.8],
                                                                            "dynamic": [0.5, 0.4]}},
        "not json",
        {"step": 2, "loss": float("nan"), "lr": 2e-4, "tokens_per_s": 100.0, "note": "text is ignored"},
        {"step": 3, "loss": 4.0, "val_loss": 4.5, "routing_entropy": {"0": 0.1}},
    ]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        f.write("\n")
    curves = training_curves(run_dir)
    assert curves["rows"] == 3 and curves["skipped_lines"] == 1
    series = curves["series"]
    assert series["loss"] == {"step": [1, 3], "value": [5.0, 4.0]}  # NaN dropped
    assert series["routing_entropy.dynamic.1"] == {"step": [1], "value": [0.4]}
    assert series["routing_entropy.0"]["value"] == [0.1]
    assert "note" not in series and "step" not in series
    json.dumps(curves, allow_nan=False)


def test_training_curves_stride_long_series(run_dir):
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 1001):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    loss = training_curves(run_dir / "metrics.jsonl", max_points=100)["series"]["loss"]
    assert len(loss["step"]) <= 101 and loss["step"][0] == 1 and loss["step"][-1] == 1000
    assert loss["strided_from"] == 1000


# ---- data readers


def test_token_batches_from_shards(tmp_path):
    from polyglu.data.shards import write_token_shards
    from polyglu.data.sources import DataError

    eos = 259
    tokens = np.array([5, 6, eos, 7, 8, 9, eos, 10] * 4, dtype=np.uint16)  # 32 tokens
    write_token_shards(tmp_path, [tokens[:16], tokens[16:]], {"kind": "byte", "name": "t", "vocab_size": 260,
                                                              "eos_id": eos})
    batches = load_token_batches(tmp_path, seq_len=8, batch_size=3, max_tokens=32, vocab_size=260)
    assert [ids.shape for ids, _ in batches] == [(3, 8), (1, 8)]
    ids, docs = batches[0]
    assert ids.dtype == torch.int64
    assert ids[0].tolist() == [5, 6, eos, 7, 8, 9, eos, 10]
    assert docs[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]  # a document ends with its EOS
    # fewer tokens than the data: windows spread over both shards
    spread = load_token_batches(tmp_path, seq_len=8, batch_size=8, max_tokens=16)
    assert spread[0][0].shape == (2, 8)
    # refused when the shards are opened (naming the shard), before any window is cut
    with pytest.raises(DataError, match="shard-00000.bin: token id 259 at token offset 2 is >= the size 100 of "
                                        "the model's vocabulary"):
        load_token_batches(tmp_path, seq_len=8, batch_size=2, max_tokens=32, vocab_size=100)
    (tmp_path / "shard-00001.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a multiple"):
        load_token_batches(tmp_path, seq_len=8, batch_size=2, max_tokens=32)


def test_token_batches_from_jsonl(tmp_path):
    from polyglu.data.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n\n" + json.dumps({"text": "de"}) + "\n")
    batches = load_token_batches(path, seq_len=4, batch_size=4, max_tokens=100, tokenizer=tok)
    ids = torch.cat([b[0].ravel() for b in batches]).tolist()
    assert ids == [97, 98, 99, tok.eos_id, 100, 101, tok.eos_id]
    assert [b[0].shape for b in batches] == [(1, 4), (1, 3)]  # the short tail gets its own batch
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no string field 'text'"):
        load_token_batches(bad, seq_len=4, batch_size=1, max_tokens=10, tokenizer=tok)


# ---- the CLI, end to end


def test_cli_analyze_end_to_end(tmp_path, run_dir):
    from polyglu.cli import main
    from polyglu.data.tokenizer import load_tokenizer

    config = ModelConfig.from_preset("debug", vocab_size=260)
    model_dir = tmp_path / "model"
    model = PolychromaticLM(config)
    model.save_pretrained(model_dir)
    load_tokenizer("byte").save(model_dir / "tokenizer")
    for step in (1, 2):
        model.save_pretrained(run_dir / f"checkpoint-{step}", extra={"step": step})
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "loss": 5.0 - step, "lr": 1e-3, "tau": 1.0,
                                "routing_entropy": {"dynamic": [0.9, 0.8]}}) + "\n")
    math_path, prose_path = tmp_path / "math.jsonl", tmp_path / "prose.jsonl"
    math_path.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(40)))
    prose_path.write_text("".join(json.dumps({"text": "the quick brown fox jumps"}) + "\n" for _ in range(20)))
    out = tmp_path / "report"
    status = main(["analyze", str(model_dir), "--data", f"{math_path},prose={prose_path}", "--out", str(out),
                   "--run", str(run_dir), "--max-tokens", "256", "--seq-len", "64", "--evolution-tokens", "64"])
    assert status == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert list(analysis["dynamic"]) == ["math", "prose"]
    assert analysis["dynamic"]["math"]["tokens"] == 256
    assert [c["step"] for c in analysis["evolution"]["checkpoints"]] == [1, 2]
    assert analysis["training"]["series"]["loss"]["value"] == [4.0, 3.0]
    for name in ("routing_map", "activation_shares", "layer_entropy", "entropy_histogram",
                 "domain_differences", "entropy_evolution", "training_curves"):
        assert (out / f"{name}.png").stat().st_size > 1000
    report = (out / "report.html").read_text()
    assert report.index("<table") < report.index("<img")
    assert report.count("data:image/png;base64,") == 7


def test_cli_analyze_errors(tmp_path, capsys):
    from polyglu.cli import main

    model_dir = tmp_path / "model"
    PolychromaticLM(ModelConfig.from_preset("debug", vocab_size=260)).save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    assert main(["analyze", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
    assert main(["analyze", str(model_dir), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such shard directory or text file" in capsys.readouterr().err


def test_rows_longer_than_the_context_are_refused_naming_seq_len(tiny_config):
    from polyglu.analysis import analyze_model

    model = PolychromaticLM(tiny_config)  # max_seq_len 64
    rows = [(torch.zeros(1, 80, dtype=torch.long), torch.zeros(1, 80, dtype=torch.long))]
    with pytest.raises(ValueError, match="80 tokens per row exceed the model context max_seq_len=64; make them "
                                         "with seq_len=64 or less"):
        analyze_model(model, {"math": rows})


@pytest.mark.parametrize("progress", [True, False])
def test_analysis_progress_bars_follow_the_flag(tiny_config, tmp_path, capsys, progress):
    from polyglu.analysis.pipeline import analyze_to_directory

    model_dir = tmp_path / "model"
    PolychromaticLM(tiny_config.replace(vocab_size=260)).save_pretrained(model_dir)  # byte ids
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(10)))
    analyze_to_directory(model_dir, {"math": str(rows)}, tmp_path / "out", max_tokens=64, seq_len=32,
                         tokenizer="byte", progress=progress, log=lambda *a: None)
    assert ("analyze math" in capsys.readouterr().err) is progress


def test_analysis_of_a_run_directory_takes_what_it_holds_and_refuses_what_is_not_a_run(tiny_config, tmp_path):
    from polyglu.analysis.pipeline import AnalysisError, analyze_to_directory

    model_dir = tmp_path / "model"
    PolychromaticLM(tiny_config.replace(vocab_size=260)).save_pretrained(model_dir)  # byte ids
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(10)))

    def analyze(run, out):
        return analyze_to_directory(model_dir, {"math": str(rows)}, tmp_path / out, run_dir=run, max_tokens=64,
                                    seq_len=32, tokenizer="byte", progress=False, log=lambda *a: None)

    (tmp_path / "a_file").write_text("x\n")
    with pytest.raises(AnalysisError, match=r"^--run .*a_file: not a directory$"):
        analyze(tmp_path / "a_file", "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match=r"^--run .*empty: neither checkpoints nor metrics.jsonl found$"):
        analyze(tmp_path / "empty", "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # refused before writing

    metrics_only = tmp_path / "metrics_only"
    metrics_only.mkdir()
    (metrics_only / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0, "lr": 1e-3, "tau": 1.0}) + "\n")
    analysis = analyze(metrics_only, "o3")
    assert "evolution" not in analysis and analysis["training"]["series"]["loss"]["value"] == [4.0]
    assert "training" in json.loads((tmp_path / "o3" / "analysis.json").read_text())


# ---- entropy at tau = 1 beside the model's tau


@pytest.mark.parametrize("scope", ["layer", "neuron"])
def test_entropy_tau1_reads_the_same_logits_at_tau_one(tiny_config, scope):
    """One layer: its logits do not depend on tau, so a second model at tau = 1 measures the same thing."""
    torch.manual_seed(0)
    model = PolychromaticLM(tiny_config.replace(n_layers=1, routing_scope=scope)).eval()
    with torch.no_grad():
        layer = model.polyglu_layers()[0]
        layer.alpha.normal_(0.0, 0.5)
        layer.gate_net[2].weight.normal_(0.0, 0.5)
        if layer.routing_map is not None:
            layer.routing_map.normal_(0.0, 1.0)
    batches = [torch.randint(0, 97, (2, 16))]
    model.set_tau(0.1)
    sharp = dynamic_routing_stats(model, batches)["layers"][0]
    model.set_tau(1.0)
    at_one = dynamic_routing_stats(model, batches)["layers"][0]
    assert sharp["routing_scope"] == scope
    assert sharp["entropy_tau1"] == pytest.approx(at_one["entropy"], rel=1e-4)
    assert sharp["variance_tau1"]["fractions"] == pytest.approx(at_one["variance"]["fractions"], rel=1e-3)
    assert at_one["entropy_tau1"] == pytest.approx(at_one["entropy"], rel=1e-6)
    assert sharp["entropy"] < 0.5 * sharp["entropy_tau1"]  # a small tau alone makes routing look decided


def test_report_shows_both_entropies_with_what_they_mean(tiny_config, tmp_path):
    from polyglu.analysis.report import COLUMN_MEANINGS, render_report, summary_rows

    model = PolychromaticLM(tiny_config).eval()
    model.set_tau(0.1)
    analysis = analyze_model(model, {"data": [torch.randint(0, 97, (2, 12))]})
    header, rows = summary_rows(analysis)
    for column in ("entropy", "entropy τ=1", "agreement", "between-input var.", "between-neuron var."):
        assert f"data: {column}" in header
        assert column in dict(COLUMN_MEANINGS)
    layer = analysis["dynamic"]["data"]["layers"][0]
    assert rows[0][header.index("data: entropy τ=1")] == f"{100 * layer['entropy_tau1']:.3g}%"
    text = render_report(analysis, {}, tmp_path / "report.html").read_text()
    assert "entropy τ=1</b>" in text and "between-neuron var.</b>" in text
