"""Statistics over seeds: mean ± sample std, Welch's and paired t against the reference variant."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from polyglu.train.ablation.config import VARIANT_DESCRIPTIONS

# two-sided 95% critical values of Student's t by degrees of freedom (1.96 beyond the table)
T_CRITICAL_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the values that are not None; std is None for n < 2."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def t_critical_95(df: float) -> float:
    """Two-sided 95% critical value of Student's t (table lookup, conservative between entries)."""
    if df < 1:
        return math.inf
    below = [k for k in T_CRITICAL_95 if k <= df]
    return T_CRITICAL_95[max(below)] if df <= max(T_CRITICAL_95) else 1.96


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
    """Difference of means of a and b with its standard error, Welch's t and degrees of freedom;
    `significant`: |t| above the two-sided 95% critical value. None when either has < 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "se": 0.0, "t": math.inf if diff else 0.0, "df": math.inf,
                "significant": diff != 0}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va or vb else math.inf
    t = diff / se
    return {"diff": diff, "se": se, "t": t, "df": df, "significant": abs(t) > t_critical_95(df)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, float] | None:
    """Mean of the per-seed differences a[s] - b[s] over the seeds both have, its standard error
    and t with n - 1 degrees of freedom. Runs of one seed share data order and validation batches,
    so pairing removes that shared noise. None for fewer than 2 shared seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    diff, df = statistics.fmean(diffs), len(diffs) - 1
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    t = diff / se if se else (math.inf if diff else 0.0)
    return {"diff": diff, "se": se, "t": t, "df": df, "n": len(seeds),
            "significant": abs(t) > t_critical_95(df)}


METRICS = {  # summary key -> how to read it from one run's results
    "tokens_per_s": lambda r: r.get("tokens_per_s"),
    "final_val_loss": lambda r: r.get("final_val_loss"),
    "best_val_loss": lambda r: r.get("best_val_loss"),
    "accuracy": lambda r: (r.get("math") or {}).get("accuracy"),
    "accuracy_easy": lambda r: (r.get("math") or {}).get("accuracy_easy"),
}


def aggregate(results: Sequence[dict[str, Any]], variants: Sequence[str] | None = None,
              reference: str = "swiglu") -> list[dict[str, Any]]:
    """One row per variant: parameters, d_ff, seeds, {metric: {mean, std, n}}, and the difference
    of final/best validation loss and accuracy to the reference: {"paired": over shared seeds,
    "welch": unpaired}."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    order = [v for v in (variants or by_variant) if v in by_variant]
    rows = []
    for variant in order:
        runs = sorted(by_variant[variant], key=lambda r: r["seed"])
        row: dict[str, Any] = {"variant": variant, "description": VARIANT_DESCRIPTIONS.get(variant, ""),
                               "seeds": [r["seed"] for r in runs], "d_ff": runs[0]["d_ff"],
                               "parameters": runs[0]["parameters"]["total"],
                               "routing_parameters": runs[0]["parameters"].get("routing", 0)}
        for key, read in METRICS.items():
            mean, std, n = mean_std([read(r) for r in runs])
            row[key] = {"mean": mean, "std": std, "n": n}
        row["vs_reference"] = {}
        if variant != reference and reference in by_variant:
            for key in ("final_val_loss", "best_val_loss", "accuracy"):
                a = {r["seed"]: METRICS[key](r) for r in runs if METRICS[key](r) is not None}
                b = {r["seed"]: METRICS[key](r) for r in by_variant[reference] if METRICS[key](r) is not None}
                row["vs_reference"][key] = {"paired": paired(a, b), "welch": welch(list(a.values()), list(b.values()))}
        rows.append(row)
    return rows


ROUTING_KEYS = {  # per-layer routing summary key -> how to read it from one layer's summary
    "entropy": lambda layer: layer.get("entropy"),
    "entropy_tau1": lambda layer: layer.get("entropy_tau1"),
    "agreement": lambda layer: layer.get("agreement"),
    "between_inputs": lambda layer: ((layer.get("variance") or {}).get("fractions") or {}).get("between_inputs"),
    "between_neurons": lambda layer: ((layer.get("variance") or {}).get("fractions") or {}).get("between_neurons"),
}


def aggregate_routing(results: Sequence[dict[str, Any]], variants: Sequence[str] | None = None
                      ) -> list[dict[str, Any]]:
    """Per variant with routing statistics, per layer: {key: {mean, std, n}} over seeds of the
    validation routing (entropy at the model's tau and at tau = 1, agreement, variance split)."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        if r.get("routing"):
            by_variant.setdefault(r["variant"], []).append(r)
    rows = []
    for variant in [v for v in (variants or by_variant) if v in by_variant]:
        runs = by_variant[variant]
        n_layers = min(len(r["routing"]) for r in runs)
        layers = []
        for i in range(n_layers):
            entry: dict[str, Any] = {"layer": runs[0]["routing"][i]["layer"]}
            for key, read in ROUTING_KEYS.items():
                mean, std, n = mean_std([read(r["routing"][i]) for r in runs])
                entry[key] = {"mean": mean, "std": std, "n": n}
            layers.append(entry)
        rows.append({"variant": variant, "seeds": sorted(r["seed"] for r in runs), "layers": layers})
    return rows
