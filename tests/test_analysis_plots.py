"""Every figure renders from an analysis JSON alone (no model), and skips what the JSON lacks."""

import json

import numpy as np
import pytest
import torch

from polyglu.analysis import analyze_model, checkpoint_evolution, training_curves
from polyglu.analysis.plots import PLOTS, render_plots, routing_map_image
from polyglu.analysis.report import findings, render_report
from polyglu.model.transformer import PolychromaticLM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysis_json(tmp_path_factory):
    """A full analysis of a tiny model with varied routing, round-tripped through JSON."""
    from polyglu.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig.from_preset("debug", vocab_size=97, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2,
                                     head_dim=8, max_seq_len=64, gate_hidden=8, n_layers=3)
    model = PolychromaticLM(config)
    run_dir = tmp_path_factory.mktemp("run")
    for step, scale in [(10, 0.5), (20, 2.0)]:
        with torch.no_grad():
            for layer in model.polyglu_layers():
                layer.alpha.normal_(0, scale)
                layer.gate_net[2].weight.normal_(0, scale)
        model.save_pretrained(run_dir / f"step-{step}")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 30):
            f.write(json.dumps({"step": step, "loss": 4 / step, "lr": 1e-3, "tau": 1 - step / 60,
                                "tokens_per_s": 1000.0, "grad_norm": 1.0,
                                "routing_entropy": {"static": [0.9, 0.8, 0.7], "dynamic": [0.5, 0.4, 0.3]}}) + "\n")
    batches = {"low": [torch.randint(0, 40, (2, 16))], "high": [torch.randint(50, 97, (2, 16))]}
    analysis = analyze_model(model, batches)
    analysis["evolution"] = checkpoint_evolution(run_dir, batches["low"])
    analysis["training"] = training_curves(run_dir)
    return json.loads(json.dumps(analysis, allow_nan=False))


@pytest.fixture(scope="module")
def rendered(analysis_json, tmp_path_factory):
    """{name: path} of every figure, each drawn once by its plot function."""
    out = tmp_path_factory.mktemp("figures")
    return {name: plot(analysis_json, out / f"{name}.png") for name, plot in PLOTS.items()}


@pytest.mark.parametrize("name", list(PLOTS))
def test_each_plot_writes_a_png(rendered, name):
    path = rendered[name]
    assert path is not None and path.name == f"{name}.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_missing_sections_are_skipped(analysis_json, tmp_path):
    static_only = {k: v for k, v in analysis_json.items() if k not in ("evolution", "training")}
    static_only.update(dynamic={}, domain_comparison=None, static_vs_dynamic={})
    written = render_plots(static_only, tmp_path)
    assert set(written) == {"routing_map", "activation_shares", "layer_entropy", "entropy_histogram"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in written)


def test_routing_map_sorts_neurons_by_activation_then_confidence():
    layer = {"neuron_preferred": [2, 0, 2, 0], "neuron_confidence": [0.4, 0.9, 1.0, 0.3]}
    image = routing_map_image([layer], ["relu", "tanh", "silu", "gelu"])
    assert image.shape == (1, 4, 3)
    relu_strong, relu_weak, silu_strong, silu_weak = image[0]
    assert relu_strong[2] > relu_strong[0]  # relu is blue
    assert silu_strong[1] > silu_strong[0]  # silu is green
    assert relu_strong.sum() < relu_weak.sum() and silu_strong.sum() < silu_weak.sum()  # pale = unsure
    np.testing.assert_allclose(image, np.clip(image, 0, 1))


def test_report_is_self_contained(analysis_json, rendered, tmp_path):
    report = render_report(analysis_json, rendered, tmp_path / "report.html").read_text()
    assert report.index("<table") < report.index("<img")
    assert report.count("data:image/png;base64,") == len(PLOTS)
    assert "src='http" not in report and 'src="http' not in report
    lines = findings(analysis_json)
    assert any("Dynamic routing on low" in line for line in lines)
    assert any("high vs low" in line for line in lines)
