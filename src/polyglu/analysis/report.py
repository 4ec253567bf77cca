"""One self-contained HTML report from an analysis JSON and its figures (images embedded as base64)."""

from __future__ import annotations

import base64
import html
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FIGURE_CAPTIONS = {
    "routing_map": "Preferred activation of every neuron, layers top to bottom; pale neurons are undecided.",
    "activation_shares": "Mean routing weight of each activation per layer.",
    "layer_entropy": "Mean routing entropy per layer. Static: softmax(α/τ) alone. Dynamic: the full routing "
                     "the model uses on the data.",
    "entropy_histogram": "Distribution of per-neuron routing entropy over all layers.",
    "domain_differences": "Routing on each dataset compared with the first one.",
    "entropy_evolution": "Routing across the run's checkpoints.",
    "training_curves": "Curves logged in metrics.jsonl.",
}


# what each summary column means, one sentence each (shown above the table)
COLUMN_MEANINGS = (
    ("entropy", "mean per-neuron routing entropy at the model's τ as a percentage of ln K (100% = uniform "
                "mix, 0% = one activation): how mixed the routing the model actually applies is."),
    ("entropy τ=1", "the same logits divided by 1 instead of τ: how decided the logits themselves are, so a "
                    "low entropy that is only a small τ shows up as a high value here."),
    ("dominant", "the activation most neurons prefer (static) or most routing decisions pick (dynamic)."),
    ("agreement", "per input, the share of a layer's neurons that pick the layer's majority activation "
                  "(100% = the whole layer switches as one)."),
    ("between-input var.", "the share of routing variance explained by the input alone (the layer as a whole "
                           "switching activation from token to token)."),
    ("between-neuron var.", "the share explained by stable differences between neurons (each neuron keeping "
                            "its own activation whatever the input); the rest is neuron-specific reactions "
                            "to the input."),
)


def pct(x: float | None) -> str:
    """A fraction as a percentage with 3 significant digits (0.0003 -> '0.03%')."""
    if x is None:
        return "–"
    return f"{100 * x:.3g}%"


def _runs(labels: list[tuple[int, str]]) -> str:
    """[(0,'gelu'), (1,'gelu'), (2,'tanh')] -> 'layers 0–1 gelu, 2 tanh'."""
    parts, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i][1] != labels[start][1]:
            a, b = labels[start][0], labels[i - 1][0]
            parts.append(f"{a}–{b} {labels[start][1]}" if a != b else f"{a} {labels[start][1]}")
            start = i
    return "layers " + ", ".join(parts)


def _layer_dominant(layer: Mapping[str, Any], activations: list[str]) -> tuple[str, float]:
    shares = layer.get("pick_shares") or layer["preferred_shares"]
    k = max(range(len(shares)), key=lambda i: shares[i])
    return activations[k], shares[k]


def findings(analysis: Mapping[str, Any]) -> list[str]:
    """A few plain sentences answering the paper's questions for this model."""
    activations = list(analysis["model"]["activations"])
    static = analysis.get("static", {}).get("layers", [])
    if not static:
        return ["The model has no PolyGLU layers: nothing is routed."]
    out = []
    static_mean = statistics.mean(layer["entropy"] for layer in static)
    out.append(f"Static routing (softmax α/τ alone): mean entropy {pct(static_mean)} of ln K; "
               f"{_runs([(la['layer'], _layer_dominant(la, activations)[0]) for la in static])} "
               "by most neurons' preference.")
    for name, dyn in (analysis.get("dynamic") or {}).items():
        layers = dyn["layers"]
        entropies = [layer["entropy"] for layer in layers]
        mean = statistics.mean(entropies)
        out.append(f"Dynamic routing on {name} ({dyn['tokens']:,} tokens): mean entropy {pct(mean)} of ln K "
                   f"(layers range {pct(min(entropies))} to {pct(max(entropies))}); dominant activation "
                   f"{_runs([(la['layer'], _layer_dominant(la, activations)[0]) for la in layers])}.")
        tau1 = [layer["entropy_tau1"] for layer in layers if layer.get("entropy_tau1") is not None]
        if tau1:
            out.append(f"At τ = 1 the same logits on {name} have mean entropy {pct(statistics.mean(tau1))} of ln K "
                       f"(layers {pct(min(tau1))} to {pct(max(tau1))}), against {pct(mean)} at the model's "
                       f"τ = {analysis['model'].get('tau')}.")
        median = statistics.median(entropies)
        high = [la["layer"] for la in layers if la["entropy"] > max(3 * median, 0.05)]
        if high:
            out.append(f"High-entropy layers on {name}: {', '.join(map(str, high))}.")
        fractions = [la["variance"]["fractions"] for la in layers if la["variance"]["fractions"]]
        if fractions:
            inputs = statistics.mean(f["between_inputs"] for f in fractions)
            neurons = statistics.mean(f["between_neurons"] for f in fractions)
            agreement = statistics.mean(la["agreement"] for la in layers)
            where = "across inputs" if inputs > neurons else "across neurons"
            out.append(f"On {name}, routing varies mostly {where}: between-input variance {pct(inputs)}, "
                       f"between-neuron {pct(neurons)} of the total (layer means); on a given input "
                       f"{pct(agreement)} of a layer's neurons pick the layer's majority activation.")
        same = (analysis.get("static_vs_dynamic") or {}).get(name)
        if same:
            agree = statistics.mean(s["preferred_same_as_static"] for s in same)
            out.append(f"On {name}, {pct(agree)} of neurons prefer the activation that α alone would pick.")
    comparison = analysis.get("domain_comparison")
    for pair in (comparison or {}).get("pairs", []):
        worst = max(pair["layers"], key=lambda la: la["preferred_changed"])
        out.append(f"{pair['domain']} vs {pair['reference']}: up to {pct(worst['preferred_changed'])} of neurons "
                   f"change preferred activation (layer {worst['layer']}); mean entropy change "
                   f"{pct(statistics.mean(la['entropy_diff'] for la in pair['layers']))} of ln K.")
    return out


def summary_rows(analysis: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer summary table."""
    activations = list(analysis["model"]["activations"])
    static = analysis.get("static", {}).get("layers", [])
    dynamic = analysis.get("dynamic") or {}
    header = ["layer", "static entropy", "static dominant"]
    for name in dynamic:
        header += [f"{name}: entropy", f"{name}: entropy τ=1", f"{name}: dominant", f"{name}: agreement",
                   f"{name}: between-input var.", f"{name}: between-neuron var."]
    rows = []
    for i, layer in enumerate(static):
        act, share = _layer_dominant(layer, activations)
        row = [str(layer["layer"]), pct(layer["entropy"]), f"{act} ({pct(share)})"]
        for dyn in dynamic.values():
            d = dyn["layers"][i]
            act, share = _layer_dominant(d, activations)
            fractions = d["variance"]["fractions"]
            row += [pct(d["entropy"]), pct(d.get("entropy_tau1")), f"{act} ({pct(share)})", pct(d["agreement"]),
                    pct(fractions["between_inputs"]) if fractions else "–",
                    pct(fractions["between_neurons"]) if fractions else "–"]
        rows.append(row)
    return header, rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(analysis: Mapping[str, Any], figures: Mapping[str, str | Path], path: str | Path,
                  title: str = "PolyGLU routing analysis") -> Path:
    """Write a single HTML file: findings and the per-layer summary table first, then the figures."""
    model = analysis["model"]
    header, rows = summary_rows(analysis)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(str(analysis.get('source', {}).get('model', '')))} · "
        f"activations {html.escape(', '.join(model['activations']))} · {model['n_layers']} layers · "
        f"d_ff {model['d_ff']} · routing_pool {html.escape(model['routing_pool'])} · routing_scope "
        f"{html.escape(str(model.get('routing_scope', 'layer')))} · τ {model['tau']}</p>",
        "<h2>Summary</h2>",
        "<ul class='note'>" + "".join(f"<li><b>{html.escape(term)}</b>: {html.escape(text)}</li>"
                                      for term, text in COLUMN_MEANINGS) + "</ul>",
        _table(header, rows),
        "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in findings(analysis)) + "</ul>",
    ]
    for name, figure in figures.items():
        data = base64.b64encode(Path(figure).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(name.replace('_', ' ').capitalize())}</h2>"
                     f"<p class='note'>{html.escape(FIGURE_CAPTIONS.get(name, ''))}</p>"
                     f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}.note,.meta{color:#555;font-size:13px}")
    text = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    path = Path(path)
    path.write_text(text)
    return path
