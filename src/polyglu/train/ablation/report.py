"""The ablation's report from whatever runs are finished: results.json, results.md (a markdown
table) and loss_curves.png (mean ± std bands over seeds)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polyglu.train.ablation.config import VARIANTS, AblationConfig
from polyglu.train.ablation.plan import RESULTS_NAME, run_dir_of
from polyglu.train.ablation.stats import aggregate, aggregate_routing


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows by step, one per step (train.metrics.read_metrics: the later row wins)."""
    from polyglu.train.metrics import read_metrics as read_metrics_log

    return read_metrics_log(run_dir).rows


def collect_results(config: AblationConfig) -> list[dict[str, Any]]:
    """The results of the configured variants × seeds that are finished, in config order."""
    out = []
    for variant in config.ablation.variants:
        for seed in config.seeds():
            path = run_dir_of(config, variant, seed) / RESULTS_NAME
            if path.is_file():
                out.append(json.loads(path.read_text()))
    return out


def _pm(cell: dict[str, Any], digits: int = 4, scale: float = 1.0, suffix: str = "") -> str:
    if cell["mean"] is None:
        return "–"
    text = f"{cell['mean'] * scale:.{digits}f}"
    if cell["std"] is not None:
        text += f" ± {cell['std'] * scale:.{digits}f}"
    return text + suffix


def _delta(tests: dict[str, Any] | None, digits: int = 4) -> str:
    test = (tests or {}).get("paired")
    if test is None:
        return "–"
    mark = " *" if test["significant"] else ""
    return f"{test['diff']:+.{digits}f} ± {test['se']:.{digits}f} (t={test['t']:+.1f}){mark}"


def markdown_table(rows: Sequence[dict[str, Any]], reference: str = "swiglu") -> str:
    """The results as a markdown table: mean ± sample std over seeds."""
    head = ("| variant | d_ff | parameters | tokens/s | final val loss | best val loss | "
            f"Δ final val vs {reference} (paired) | exact match | exact match (difficulty 1–2) | seeds |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['d_ff']} | {row['parameters']:,} | {_pm(row['tokens_per_s'], 0)} | "
            f"{_pm(row['final_val_loss'])} | {_pm(row['best_val_loss'])} | "
            f"{_delta(row['vs_reference'].get('final_val_loss')) if row['variant'] != reference else '(reference)'} | "
            f"{_pm(row['accuracy'], 1, 100, '%')} | {_pm(row['accuracy_easy'], 1, 100, '%')} | {len(row['seeds'])} |")
    return "\n".join(lines)


def routing_table(routing_rows: Sequence[dict[str, Any]]) -> str:
    """Per variant and layer, the validation routing as a markdown table (percentages, mean ± std over seeds)."""
    lines = ["| variant | layer | entropy (τ end) | entropy (τ = 1) | agreement | between-input var. | "
             "between-neuron var. | seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in routing_rows:
        for layer in row["layers"]:
            cells = [_pm(layer[key], 1, 100, "%") for key in ("entropy", "entropy_tau1", "agreement",
                                                              "between_inputs", "between_neurons")]
            lines.append(f"| {row['variant']} | {layer['layer']} | " + " | ".join(cells) + f" | {len(row['seeds'])} |")
    return "\n".join(lines)


def report_ablation(config: AblationConfig, log: Callable[..., Any] = print) -> dict[str, Any]:
    """Aggregate the finished runs into output_dir/results.json, results.md and loss_curves.png
    (results-matched.json, ... with `matched_params`)."""
    from polyglu.atomic import atomic_write_text

    a = config.ablation
    results = collect_results(config)
    rows = aggregate(results, a.variants, a.reference)
    routing_rows = aggregate_routing(results, a.variants)
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-matched" if a.matched_params else ""
    json_path, md_path = out / f"results{suffix}.json", out / f"results{suffix}.md"
    plot_path = None
    if a.plot and results:
        try:
            plot_path = plot_loss_curves({v: [Path(r["run_dir"]) for r in results if r["variant"] == v]
                                          for v in a.variants}, out / f"loss_curves{suffix}.png")
        except ImportError as e:  # matplotlib is the [plots] extra
            log(f"loss-curve plot skipped ({e})")
    routing_plot = None
    if a.plot and routing_rows:
        try:
            routing_plot = plot_routing(routing_rows, out / f"routing{suffix}.png")
        except ImportError as e:
            log(f"routing plot skipped ({e})")
    report = {"config": config.to_dict(), "reference": a.reference, "summary": rows, "routing": routing_rows,
              "runs": results, "plot": str(plot_path) if plot_path else None,
              "routing_plot": str(routing_plot) if routing_plot else None}
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    train = config.base.train
    tokens = results[0]["tokens"] if results else None
    matched = f" (PolyGLU d_ff matched to {a.reference}'s parameters)" if a.matched_params else ""
    lines = [f"# Ablation results{matched}", "",
             f"{len(results)} runs; {train.max_steps} steps × {train.batch_size} × {config.base.data.seq_len} "
             f"tokens ({tokens:,} tokens per run)" if tokens else f"{len(results)} runs", "",
             markdown_table(rows, a.reference), "",
             "mean ± sample standard deviation over seeds. Δ: mean over seeds of the difference to the "
             "reference run of the same seed (same data order), ± its standard error, with t (n - 1 degrees "
             "of freedom); * marks |t| above the two-sided 95% critical value. results.json also holds the "
             "unpaired (Welch) test. tokens/s: median over the logged windows of a run; runs go one after "
             "another, seed by seed.", ""]
    if plot_path:
        lines += [f"![loss curves]({plot_path.name})", ""]
    if routing_rows:
        lines += ["## Routing on validation data", "", routing_table(routing_rows), "",
                  "Per layer, mean ± std over seeds, on the run's first `train.eval_batches` validation batches "
                  "(eval mode, no noise). Entropy: mean per-neuron routing entropy as a share of ln K at the "
                  "model's final τ; τ = 1: the same logits divided by 1. Agreement: per input, the share of a "
                  "layer's neurons picking the layer's majority activation. Variance split: shares of the "
                  "routing variance explained by the input alone (the layer switching as one) and by stable "
                  "differences between neurons.", ""]
        if routing_plot:
            lines += [f"![routing]({routing_plot.name})", ""]
    atomic_write_text(md_path, "\n".join(lines))
    log("\n" + markdown_table(rows, a.reference))
    log(f"\nreport: {md_path}, {json_path}" + (f", {plot_path}" if plot_path else ""))
    return report


def curve_band(run_dirs: Sequence[Path], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every run, and the mean and sample std over runs of `key` at those steps."""
    per_run = [{r["step"]: r[key] for r in read_metrics(d) if r.get(key) is not None} for d in run_dirs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return [], [], []
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    means = [statistics.fmean(p[s] for p in per_run) for s in steps]
    stds = [statistics.stdev([p[s] for p in per_run]) if len(per_run) > 1 else 0.0 for s in steps]
    return steps, means, stds


def plot_loss_curves(runs: dict[str, Sequence[Path]], path: str | Path) -> Path | None:
    """Training and validation loss per variant (mean over seeds with a ± std band), and the final
    validation loss of every run next to its variant's mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {v: dirs for v, dirs in runs.items() if dirs}
    if not runs:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    colors = plt.get_cmap("tab10")
    for i, (variant, dirs) in enumerate(runs.items()):
        style = "-" if VARIANTS.get(variant, {}).get("ffn") == "polyglu" else "--"
        for ax, key in zip(axes, ("loss", "val_loss")):
            steps, means, stds = curve_band(dirs, key)
            if not steps:
                continue
            label = f"{variant} (n={len(dirs)})"
            ax.plot(steps, means, style, color=colors(i % 10), label=label, linewidth=1.4,
                    marker="o" if key == "val_loss" else None, markersize=3)
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colors(i % 10), alpha=0.15, linewidth=0)
        finals = [rows[-1]["val_loss"] for rows in ([r for r in read_metrics(d) if r.get("val_loss") is not None]
                                                   for d in dirs) if rows]
        if finals:
            axes[2].plot([i] * len(finals), finals, "o", color=colors(i % 10), alpha=0.5, markersize=4)
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            axes[2].errorbar([i + 0.2], [statistics.fmean(finals)], yerr=[spread], fmt="s", color=colors(i % 10),
                             capsize=3, markersize=5)
    for ax, title in zip(axes[:2], ("training loss", "validation loss")):
        ax.set_title(f"{title} (mean ± std over seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    _zoom_to_second_half(axes[:2])
    axes[2].set_title("final validation loss: seeds (o), mean ± std (■)")
    axes[2].set_xticks(range(len(runs)), list(runs), rotation=35, ha="right", fontsize=8)
    axes[2].set_ylabel("cross-entropy (nats/token)")
    axes[2].grid(alpha=0.3, axis="y")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_routing(routing_rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Per layer and variant (mean ± std over seeds): entropy at the final τ, entropy at τ = 1,
    agreement and the between-input share of the routing variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not routing_rows:
        return None
    panels = (("entropy", "entropy at final τ (% of ln K)"), ("entropy_tau1", "entropy at τ = 1 (% of ln K)"),
              ("agreement", "agreement (% of neurons on the majority)"),
              ("between_inputs", "between-input share of variance (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.0))
    colors = plt.get_cmap("tab10")
    width = 0.8 / len(routing_rows)
    for i, row in enumerate(routing_rows):
        xs = [layer["layer"] + (i - (len(routing_rows) - 1) / 2) * width for layer in row["layers"]]
        for ax, (key, _) in zip(axes, panels):
            means = [100 * (layer[key]["mean"] or 0.0) for layer in row["layers"]]
            errors = [100 * (layer[key]["std"] or 0.0) for layer in row["layers"]]
            ax.bar(xs, means, width, yerr=errors, color=colors(i % 10), capsize=2,
                   label=f"{row['variant']} (n={len(row['seeds'])})")
    layers = sorted({layer["layer"] for row in routing_rows for layer in row["layers"]})
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _zoom_to_second_half(axes) -> None:
    """Fit each panel's y-range to the curves after the first quarter of training, where the
    variants differ (the early, much higher losses leave the frame)."""
    for ax in axes:
        ys = [y for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())
              if x >= 0.25 * max(line.get_xdata())]
        if ys:
            low, high = min(ys), max(ys)
            ax.set_ylim(low * 0.97, high * 1.03)
