"""Figures from an analysis JSON (the dict written by `polyglu analyze`); no model, no torch.

Every `plot_*(analysis, path)` writes one PNG and returns its path, or returns None without
writing when the analysis lacks that section. `render_plots` writes all that apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# one colour per activation name, the same in every figure
ACTIVATION_COLORS = {
    "relu": "#1f77b4", "tanh": "#d62728", "silu": "#2ca02c", "gelu": "#9467bd",
    "gelu_tanh": "#8c564b", "identity": "#7f7f7f", "sigmoid": "#e377c2", "softplus": "#bcbd22",
}
DPI = 110
MAX_DOMAIN_PANELS = 3
METRIC_TITLES = {"loss": "loss", "lr": "learning rate", "tau": "τ (routing temperature)",
                 "tokens_per_s": "throughput (tokens/s)", "grad_norm": "gradient norm"}


def activation_color(name: str) -> str:
    return ACTIVATION_COLORS.get(name, "#17becf")


def _activations(analysis: Mapping[str, Any]) -> list[str]:
    return list(analysis["model"]["activations"])


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _routing_sources(analysis: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """("static", stats) then ("dynamic: <domain>", stats) for each domain (capped)."""
    sources = []
    if not (analysis.get("static") or {}).get("layers"):
        return sources  # no PolyGLU layer: nothing is routed
    sources.append(("static (softmax α/τ)", analysis["static"]))
    for name, stats in list((analysis.get("dynamic") or {}).items())[:MAX_DOMAIN_PANELS]:
        sources.append((f"dynamic: {name}", stats))
    return sources


def _activation_legend(activations: list[str]) -> list[Patch]:
    return [Patch(color=activation_color(a), label=a) for a in activations]


def _layer_axis(ax, axis: str = "x") -> None:
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)("layer")


def _percent_axis(ax, values: list[float]) -> None:
    """Log scale when the entropies span orders of magnitude (near-deterministic routing)."""
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_ylabel("entropy (% of ln K)")


# --------------------------------------------------------------------------------------------


def routing_map_image(layers: list[Mapping[str, Any]], activations: list[str]) -> np.ndarray:
    """(L, F, 3) RGB: per layer the neurons sorted by preferred activation, then confidence (high
    first); colour names the activation, paleness shows low confidence."""
    K = len(activations)
    colors = np.array([matplotlib.colors.to_rgb(activation_color(a)) for a in activations])
    width = max(len(layer["neuron_preferred"]) for layer in layers)
    image = np.ones((len(layers), width, 3))
    for row, layer in enumerate(layers):
        preferred = np.asarray(layer["neuron_preferred"], dtype=int)
        confidence = np.asarray(layer["neuron_confidence"], dtype=float)
        order = np.lexsort((-confidence, preferred))
        strength = (confidence[order] - 1.0 / K) / (1.0 - 1.0 / K) if K > 1 else np.ones(len(order))
        strength = 0.2 + 0.8 * np.clip(strength, 0.0, 1.0)
        image[row, : len(order)] = 1.0 - strength[:, None] * (1.0 - colors[preferred[order]])
    return image


def plot_routing_map(analysis: Mapping[str, Any], path: str | Path) -> Path | None:
    """The neurotransmitter map: layers x neurons coloured by each neuron's preferred activation."""
    sources = _routing_sources(analysis)
    if not sources:
        return None
    activations = _activations(analysis)
    n_layers = len(sources[0][1]["layers"])
    fig, axes = plt.subplots(len(sources), 1, figsize=(11, 1.4 + (min(0.28 * n_layers, 5.0) + 0.9) * len(sources)),
                             squeeze=False, layout="constrained")
    for ax, (title, stats) in zip(axes[:, 0], sources):
        layers = stats["layers"]
        ax.imshow(routing_map_image(layers, activations), aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(layer["layer"]) for layer in layers], fontsize=7 if len(layers) > 16 else 9)
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("neurons, sorted within each layer by preferred activation, then confidence "
                           "(pale = low confidence)")
    fig.suptitle("Routing map: preferred activation of every neuron", fontsize=12)
    fig.legend(handles=_activation_legend(activations), loc="outside lower center", ncol=len(activations),
               frameon=False, fontsize=9)
    return _save(fig, path)


def plot_activation_shares(analysis: Mapping[str, Any], path: str | Path) -> Path | None:
    """Stacked bars per layer: mean routing weight of each activation."""
    sources = _routing_sources(analysis)
    if not sources:
        return None
    activations = _activations(analysis)
    fig, axes = plt.subplots(1, len(sources), figsize=(4.2 * len(sources) + 1.5, 4.2), squeeze=False, sharey=True)
    for ax, (title, stats) in zip(axes[0], sources):
        layers = stats["layers"]
        x = np.arange(len(layers))
        bottom = np.zeros(len(layers))
        for k, name in enumerate(activations):
            share = np.array([layer["shares"][k] for layer in layers])
            ax.bar(x, share, bottom=bottom, color=activation_color(name), width=0.85, label=name)
            bottom += share
        ax.set_xticks(x)
        ax.set_xticklabels([str(layer["layer"]) for layer in layers], fontsize=7 if len(layers) > 16 else 9,
                           rotation=90 if len(layers) > 16 else 0)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
    axes[0, 0].set_ylabel("mean routing weight")
    fig.suptitle("Activation shares per layer", fontsize=12)
    axes[0, -1].legend(handles=_activation_legend(activations), loc="center left", bbox_to_anchor=(1.02, 0.5),
                       frameon=False, title="activation")
    return _save(fig, path)


def plot_layer_entropy(analysis: Mapping[str, Any], path: str | Path) -> Path | None:
    """Mean routing entropy per layer, static vs dynamic (each domain)."""
    sources = _routing_sources(analysis)
    if not sources:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    values = []
    for i, (title, stats) in enumerate(sources):
        layers = stats["layers"]
        y = [100 * layer["entropy"] for layer in layers]
        values += y
        ax.plot([layer["layer"] for layer in layers], y, marker="o", ms=4, label=title,
                linestyle="--" if i == 0 else "-", color="black" if i == 0 else f"C{i - 1}")
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0], 100, " uniform mix", va="bottom", fontsize=8, color="grey")
    _percent_axis(ax, values)
    _layer_axis(ax)
    ax.set_title("Routing entropy per layer: static vs dynamic")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_entropy_histogram(analysis: Mapping[str, Any], path: str | Path) -> Path | None:
    """Distribution of per-neuron entropy, all layers pooled. Near-deterministic routing (most
    neurons below 1% of ln K) is shown on log-spaced bins, where 0.03% and 3% stay apart."""
    sources = _routing_sources(analysis)
    if not sources:
        return None
    values = {title: 100 * np.concatenate([np.asarray(layer["neuron_entropy"], dtype=float)
                                           for layer in stats["layers"]]) for title, stats in sources}
    pooled = np.concatenate(list(values.values()))
    log_scale = np.median(pooled) < 1.0
    if log_scale:
        floor = 1e-4  # % of ln K; smaller entropies are counted in the first bin
        edges = np.logspace(math.log10(floor), 2, 25)
    else:
        edges = np.linspace(0, 100, 21)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (title, v) in enumerate(values.items()):
        counts, _ = np.histogram(np.clip(v, edges[0], 100), bins=edges)
        ax.stairs(counts, edges, label=title, lw=1.8, color="black" if i == 0 else f"C{i - 1}",
                  linestyle="--" if i == 0 else "-")
    if log_scale:
        ax.set_xscale("log")
        ax.set_xlabel("per-neuron routing entropy (% of ln K, log scale; first bin includes 0)")
    else:
        ax.set_xlabel("per-neuron routing entropy (% of ln K)")
    ax.set_xlim(edges[0], 100)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("neurons (all layers)")
    ax.set_title("How decided is each neuron? (0% = one activation, 100% = uniform mix)")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_domain_differences(analysis: Mapping[str, Any], path: str | Path) -> Path | None:
    """Entropy per domain, neurons changing preference, and share differences vs the reference domain."""
    comparison = analysis.get("domain_comparison")
    if not comparison or not comparison.get("pairs") or not comparison["pairs"][0]["layers"]:
        return None
    activations = _activations(analysis)
    pairs = comparison["pairs"][:MAX_DOMAIN_PANELS]
    fig, axes = plt.subplots(1, 2 + len(pairs), figsize=(4.4 * (2 + len(pairs)), 4.2), squeeze=False)
    axes = axes[0]
    values = []
    for i, name in enumerate(comparison["domains"]):
        layers = analysis["dynamic"][name]["layers"]
        y = [100 * layer["entropy"] for layer in layers]
        values += y
        axes[0].plot([layer["layer"] for layer in layers], y, marker="o", ms=4, label=name, color=f"C{i}")
    _percent_axis(axes[0], values)
    _layer_axis(axes[0])
    axes[0].set_title("Dynamic entropy per domain", fontsize=10)
    axes[0].legend(fontsize=8, frameon=False)
    axes[0].grid(alpha=0.3)
    for i, pair in enumerate(pairs):
        layers = pair["layers"]
        axes[1].plot([layer["layer"] for layer in layers], [100 * layer["preferred_changed"] for layer in layers],
                     marker="o", ms=4, color=f"C{i + 1}", label=f"{pair['domain']} vs {pair['reference']}")
    axes[1].set_ylim(bottom=0)
    _layer_axis(axes[1])
    axes[1].set_ylabel("neurons (%)")
    axes[1].set_title("Neurons whose preferred activation changes", fontsize=10)
    axes[1].legend(fontsize=8, frameon=False)
    axes[1].grid(alpha=0.3)
    for ax, pair in zip(axes[2:], pairs):
        diff = np.array([[v if v is not None else 0.0 for v in layer["share_diff"]] for layer in pair["layers"]])
        limit = max(float(np.abs(diff).max()), 1e-6)
        im = ax.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(activations)))
        ax.set_xticklabels(activations, rotation=30)
        ax.set_yticks(range(len(pair["layers"])))
        ax.set_yticklabels([str(layer["layer"]) for layer in pair["layers"]], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"Share change: {pair['domain']} − {pair['reference']}", fontsize=10)
        fig.colorbar(im, ax=ax, label="Δ mean routing weight", shrink=0.85)
    fig.suptitle("Routing across domains", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_entropy_evolution(analysis: Mapping[str, Any], path: str | Path) -> Path | None:
    """Routing entropy per layer and activation shares across a run's checkpoints."""
    evolution = analysis.get("evolution")
    if not evolution or not evolution.get("checkpoints") or not evolution["checkpoints"][0]["static"]:
        return None
    checkpoints = evolution["checkpoints"]
    activations = _activations(analysis)
    steps = [c["step"] if c["step"] is not None else i for i, c in enumerate(checkpoints)]
    views = [v for v in ("static", "dynamic") if all(v in c for c in checkpoints)]
    fig, axes = plt.subplots(1, len(views) + 1, figsize=(5.2 * (len(views) + 1), 4.2), squeeze=False)
    axes = axes[0]
    n_layers = len(checkpoints[0]["static"])
    cmap = plt.get_cmap("viridis")
    for ax, view in zip(axes, views):
        values = []
        for j in range(n_layers):
            y = [100 * c[view][j]["entropy"] for c in checkpoints]
            values += y
            ax.plot(steps, y, marker="o", ms=3, color=cmap(j / max(n_layers - 1, 1)),
                    label=f"layer {checkpoints[0][view][j]['layer']}")
        _percent_axis(ax, values)
        ax.set_xlabel("training step")
        ax.set_title(f"{view.capitalize()} routing entropy per layer", fontsize=10)
        ax.grid(alpha=0.3)
    if n_layers <= 12:
        axes[0].legend(fontsize=7, frameon=False, ncol=2)
    else:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_layers - 1))
        fig.colorbar(sm, ax=axes[len(views) - 1], label="layer")
    view = views[-1]
    share_key = "pick_shares" if view == "dynamic" else "preferred_shares"
    bottom = np.zeros(len(steps))
    for k, name in enumerate(activations):
        share = np.array([np.mean([layer[share_key][k] for layer in c[view]]) for c in checkpoints])
        axes[-1].fill_between(steps, bottom, bottom + share, color=activation_color(name), label=name, step=None)
        bottom += share
    axes[-1].set_ylim(0, 1)
    axes[-1].set_xlabel("training step")
    axes[-1].set_ylabel("share of neurons" if view == "static" else "share of routing decisions")
    axes[-1].set_title("Routing decisions by activation, all layers" if view == "dynamic"
                       else "Neurons by preferred activation, all layers (static)", fontsize=10)
    axes[-1].legend(handles=_activation_legend(activations), fontsize=8, frameon=False, loc="center left",
                    bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Routing across training checkpoints", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def _training_panels(series: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """Group metric keys into panels: losses together, routing entropy together, then one per key."""
    skip = {"tokens", "epoch", "time", "elapsed", "elapsed_s", "wall_time"}
    keys = [k for k in series if k not in skip]
    panels, used = [], set()
    losses = [k for k in keys if k.endswith("loss") and "." not in k]
    if losses:
        panels.append(("loss", losses))
        used.update(losses)
    for prefix in ("routing_entropy",):
        group = [k for k in keys if k.startswith(prefix)]
        for view in ("static", "dynamic"):
            sub = [k for k in group if f".{view}" in k]
            if sub:
                panels.append((f"{prefix} ({view})", sub))
                used.update(sub)
        rest = [k for k in group if k not in used]
        if rest:
            panels.append((prefix, rest))
            used.update(rest)
    order = ["lr", "tau", "tokens_per_s", "grad_norm"]
    for key in sorted(k for k in keys if k not in used):
        panels.append((key, [key]))
    panels.sort(key=lambda p: (p[0] != "loss", order.index(p[0]) if p[0] in order else len(order)))
    return panels[:12]


def plot_training_curves(analysis: Mapping[str, Any], path: str | Path) -> Path | None:
    """Every curve of metrics.jsonl: loss, LR, τ, tokens/s, gradient norm, routing entropy per layer."""
    training = analysis.get("training")
    if not training or not training.get("series"):
        return None
    series = training["series"]
    panels = _training_panels(series)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.ravel(), panels):
        cmap = plt.get_cmap("viridis") if len(keys) > 4 else None
        for j, key in enumerate(keys):
            color = cmap(j / max(len(keys) - 1, 1)) if cmap else f"C{j}"
            label = key.split(".")[-1] if "." in key else key
            ax.plot(series[key]["step"], series[key]["value"], lw=1.2, color=color,
                    label=f"layer {label}" if title.startswith("routing_entropy") else label)
        ax.set_title(METRIC_TITLES.get(title, title.replace("_", " ")), fontsize=10)
        ax.set_xlabel("step")
        if title == "loss" or title.startswith("routing_entropy"):
            values = [v for k in keys for v in series[k]["value"] if v is not None]
            if values and min(values) > 0 and max(values) / min(values) > 30:
                ax.set_yscale("log")
        if 1 < len(keys) <= 8:
            ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Training dynamics ({training.get('rows', '?')} logged steps)", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


PLOTS = {
    "routing_map": plot_routing_map,
    "activation_shares": plot_activation_shares,
    "layer_entropy": plot_layer_entropy,
    "entropy_histogram": plot_entropy_histogram,
    "domain_differences": plot_domain_differences,
    "entropy_evolution": plot_entropy_evolution,
    "training_curves": plot_training_curves,
}


def render_plots(analysis: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write every figure the analysis has data for as out_dir/<name>.png: {name: path}."""
    written = {}
    for name, plot in PLOTS.items():
        path = plot(analysis, Path(out_dir) / f"{name}.png")
        if path is not None:
            written[name] = path
    return written
