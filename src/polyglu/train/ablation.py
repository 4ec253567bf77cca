"""Controlled ablation: PolyGLU and its routing ablations against SwiGLU and single-activation GLUs.

Every variant × seed is one ordinary pre-training run (`build_run` → `Trainer.fit`) made from the
same base run config, in `output_dir/<variant>/seed-<s>/`. Only the variant's model fields differ, so
all runs share the data order (the loader is seeded by the run's seed), token budget, optimiser and
schedules; seed s changes initialisation, data order and routing noise together, for every variant
alike. Afterwards the final model is scored by exact match on held-out problems of the built-in
math corpus, prompted as in pre-training ("Question: ...\\nAnswer:").

Runs go one after another and the ablation resumes where it stopped: a run with `final/` at
`max_steps` and `results.json` is read back, not retrained; an interrupted one continues from its
latest checkpoint (`Trainer.resume`). The report aggregates whatever runs are finished:
results.json, results.md (mean ± sample std over seeds, and each variant's difference to the
reference with Welch's t), loss_curves.png (mean ± std bands). With `matched_params` the PolyGLU
variants get the d_ff that matches the reference's parameter count and run in
`<variant>-matched/`, next to the unmatched runs and reusing the same baseline runs.

    config = AblationConfig.load("configs/ablation-tiny.yaml")
    report = run_ablation(config)          # or report_ablation(config) for finished runs only
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyglu.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    dataclass_from_dict,
    load_config,
    to_jsonable,
)

# variant -> the model fields it sets on top of the base config
VARIANTS: dict[str, dict[str, Any]] = {
    "polyglu": {"ffn": "polyglu", "routing_mode": "full", "routing_noise": True},
    "polyglu-static": {"ffn": "polyglu", "routing_mode": "static", "routing_noise": True},
    "polyglu-dynamic": {"ffn": "polyglu", "routing_mode": "dynamic", "routing_noise": True},
    "polyglu-nonoise": {"ffn": "polyglu", "routing_mode": "full", "routing_noise": False},
    "swiglu": {"ffn": "swiglu"},
    "geglu": {"ffn": "geglu"},
    "reglu": {"ffn": "reglu"},
    "tanhglu": {"ffn": "tanhglu"},
}
VARIANT_DESCRIPTIONS = {
    "polyglu": "static α + dynamic β·gate_net, Gumbel noise",
    "polyglu-static": "α only (no gate_net)",
    "polyglu-dynamic": "β·gate_net only (α fixed at 0)",
    "polyglu-nonoise": "full routing, no Gumbel noise",
    "swiglu": "SiLU gate",
    "geglu": "GELU gate",
    "reglu": "ReLU gate",
    "tanhglu": "tanh gate",
}
RESULTS_NAME = "results.json"
SPEC_NAME = "ablation_spec.json"
# train keys that change neither the computation nor its results: free to differ on a resume
COSMETIC_TRAIN_KEYS = ("progress", "threads", "tensorboard", "wandb_project")
# two-sided 95% critical values of Student's t by degrees of freedom (1.96 beyond the table)
T_CRITICAL_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


@dataclass
class AblationSection:
    """What to compare and how to score it; the `ablation:` section of an ablation config."""

    output_dir: str = "runs/ablation"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 3  # runs per variant, with train.seed = base seed + 0, 1, ...
    # shrink d_ff of the PolyGLU variants so their total parameters match the reference's
    matched_params: bool = False
    reference: str = "swiglu"  # the variant the others are compared with (and matched to)
    eval_problems: int = 200  # held-out math test problems per run; 0 skips the math evaluation
    eval_chat: bool = False  # False: plain "Question: ...\nAnswer:" prompts, the pre-training format
    eval_max_new_tokens: int = 96
    eval_batch_size: int = 100
    plot: bool = True

    def __post_init__(self) -> None:
        for name in [*self.variants, self.reference]:
            if name not in VARIANTS:
                raise ConfigError(f"ablation: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        if not self.variants:
            raise ConfigError("ablation.variants must name at least one variant")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"ablation.variants has duplicates: {self.variants}")
        if self.seeds < 1:
            raise ConfigError(f"ablation.seeds must be >= 1, got {self.seeds}")
        if self.eval_problems < 0:
            raise ConfigError(f"ablation.eval_problems must be >= 0, got {self.eval_problems}")
        for name in ("eval_max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ablation.{name} must be positive, got {getattr(self, name)}")


@dataclass
class AblationConfig:
    """`base`: the run config every variant starts from (model/data/train as in `polyglu train`);
    `ablation`: variants, seeds, parameter matching, evaluation."""

    base: RunConfig = field(default_factory=RunConfig)
    ablation: AblationSection = field(default_factory=AblationSection)

    def __post_init__(self) -> None:
        if self.base.task != "pretrain":
            raise ConfigError(f"base.task must be 'pretrain' for an ablation, got {self.base.task!r}")
        if self.base.init_from:
            raise ConfigError("base.init_from is not supported: every variant is trained from scratch")
        for key in ("ffn", "routing_mode", "routing_noise"):
            if key in self.base.model:
                raise ConfigError(f"base.model.{key} is set by each variant; remove it from the base config")

    @classmethod
    def load(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> AblationConfig:
        """Read a YAML/JSON ablation config; `overrides` are dotted `key=value` items
        (e.g. `base.train.max_steps=50`, `ablation.seeds=1`)."""
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @property
    def output_dir(self) -> Path:
        return Path(self.ablation.output_dir)

    def seeds(self) -> list[int]:
        return [self.base.train.seed + i for i in range(self.ablation.seeds)]


# --------------------------------------------------------------------------------------------
# variants


def variant_model_fields(config: AblationConfig, variant: str, d_ff: int | None = None) -> dict[str, Any]:
    """The `model:` section of a variant's run config (preset name kept)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    fields = {**config.base.model, **VARIANTS[variant]}
    if d_ff is not None:
        fields["d_ff"] = d_ff
    return fields


def variant_model_config(config: AblationConfig, variant: str, d_ff: int | None = None) -> ModelConfig:
    fields = dict(variant_model_fields(config, variant, d_ff))
    preset = fields.pop("preset", None)
    return ModelConfig.from_preset(preset, **fields) if preset else ModelConfig.from_dict(fields, where="model")


def parameter_total(model_config: ModelConfig) -> int:
    """Total parameters (tied weights once) of a model built on the meta device: no memory, no init."""
    import torch

    from polyglu.model.stats import parameter_counts
    from polyglu.model.transformer import PolychromaticLM

    with torch.device("meta"):
        model = PolychromaticLM(model_config)
    return int(parameter_counts(model)["total"])


def matched_d_ff(model_config: ModelConfig, target_params: int) -> int:
    """The d_ff whose total parameter count is closest to `target_params` (ties: the larger d_ff).

    The count is linear in d_ff (projections and α grow with it, gate_net does not), so two counts
    give the line and the neighbours of its solution are checked exactly. The embedding enters
    both sides alike, so the answer does not depend on the vocabulary size.
    """
    d = model_config.d_ff
    at_d, below = parameter_total(model_config), parameter_total(model_config.replace(d_ff=max(1, d - 1)))
    slope = at_d - below if d > 1 else at_d
    guess = d - (at_d - target_params) / slope
    candidates = {max(1, math.floor(guess)), max(1, math.ceil(guess))}
    counts = {c: parameter_total(model_config.replace(d_ff=c)) for c in candidates}
    return min(counts, key=lambda c: (abs(counts[c] - target_params), -c))


def variant_d_ff(config: AblationConfig) -> dict[str, int | None]:
    """d_ff per variant: None (the base value) unless `matched_params`, where every PolyGLU variant
    gets the d_ff that matches the reference's total parameters."""
    out: dict[str, int | None] = {v: None for v in config.ablation.variants}
    if not config.ablation.matched_params:
        return out
    reference = config.ablation.reference
    if VARIANTS[reference]["ffn"] == "polyglu":
        raise ConfigError(f"ablation.matched_params needs a baseline reference, got {reference!r}")
    target = parameter_total(variant_model_config(config, reference))
    for variant in out:
        if VARIANTS[variant]["ffn"] == "polyglu":
            out[variant] = matched_d_ff(variant_model_config(config, variant), target)
    return out


def is_matched(config: AblationConfig, variant: str) -> bool:
    return config.ablation.matched_params and VARIANTS[variant]["ffn"] == "polyglu"


def run_dir_of(config: AblationConfig, variant: str, seed: int) -> Path:
    """output_dir/<variant>/seed-<s>; a parameter-matched PolyGLU variant is <variant>-matched, so
    matched and unmatched runs share one directory and its baselines."""
    name = f"{variant}-matched" if is_matched(config, variant) else variant
    return config.output_dir / name / f"seed-{seed}"


def variant_run_config(config: AblationConfig, variant: str, seed: int, d_ff: int | None = None) -> RunConfig:
    """The full run config of one variant × seed: the base with the variant's model fields, the
    seed, its run directory and the shared built-in data directory."""
    data = config.base.to_dict()
    data["model"] = variant_model_fields(config, variant, d_ff)
    data["run_dir"] = str(run_dir_of(config, variant, seed))
    data["train"]["seed"] = seed
    if not data["data"].get("builtin_dir"):
        data["data"]["builtin_dir"] = str(config.output_dir / "data")
    try:
        return dataclass_from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"variant {variant}: {e}") from None


# --------------------------------------------------------------------------------------------
# one run


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows by step; a step logged twice (a resumed run repeats the steps after its
    last checkpoint) keeps its later row."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def _final_step(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "final" / "config.json").read_text()).get("step")
    except (OSError, ValueError):
        return None


def is_finished(run_dir: str | Path) -> bool:
    """Trained to the end (final/ written at max_steps) and scored (results.json)."""
    return (Path(run_dir) / RESULTS_NAME).is_file() and (Path(run_dir) / "final" / "config.json").is_file()


def spec_conflicts(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a stored run config and the current one. A key the
    stored config lacks is no conflict: it is a field added to the config since that run."""
    out = []
    for key, old in stored.items():
        name = f"{prefix}{key}"
        if key not in current:
            out.append(name)
        elif isinstance(old, dict) and isinstance(current[key], dict):
            out += spec_conflicts(old, current[key], name + ".")
        elif old != current[key]:
            out.append(name)
    return out


def _check_spec(run_dir: Path, spec: dict[str, Any]) -> None:
    """A run directory belongs to one run config: refuse to continue or reuse it for another."""
    path = run_dir / SPEC_NAME
    if path.is_file():
        conflicts = spec_conflicts(json.loads(path.read_text()), spec)
        if conflicts:
            raise ConfigError(f"{run_dir} holds a run with a different config ({', '.join(conflicts)} differ; "
                              f"see {path}): use another ablation.output_dir or delete the directory")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    from polyglu.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(spec, indent=2) + "\n")


def held_out_problems(config: AblationConfig) -> list[dict]:
    """The first `eval_problems` of the built-in corpus's held-out test split (disjoint from
    training by construction), generated from the data seed: the same problems for every run."""
    from polyglu.data.synthetic import generate_problems

    return generate_problems("test", config.ablation.eval_problems, seed=config.base.data.builtin_seed)


def run_variant(config: AblationConfig, variant: str, seed: int, d_ff: int | None = None,
                device: str | None = None, log: Callable[..., Any] = print) -> dict[str, Any]:
    """Train (or resume, or read back) one variant × seed and score it; returns its results."""
    import torch

    from polyglu.checkpoint import atomic_write_text, load_model
    from polyglu.model.stats import parameter_counts
    from polyglu.train import checkpointing as ckpt
    from polyglu.train.setup import build_run

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_config = variant_run_config(config, variant, seed, d_ff)
    run_dir = Path(run_config.run_dir)
    spec = run_config.to_dict()
    for key in COSMETIC_TRAIN_KEYS:
        spec["train"].pop(key, None)
    _check_spec(run_dir, spec)
    if is_finished(run_dir):
        log(f"finished earlier: {run_dir / RESULTS_NAME}")
        return json.loads((run_dir / RESULTS_NAME).read_text())

    max_steps = run_config.train.max_steps
    train_seconds = None
    if _final_step(run_dir) != max_steps:
        if ckpt.latest_checkpoint(run_dir) is None and (run_dir / "metrics.jsonl").is_file():
            (run_dir / "metrics.jsonl").unlink()  # rows of an attempt that never reached a checkpoint
        trainer = build_run(run_config, device=device, log=log)
        trainer.resume()
        start = time.perf_counter()
        trainer.fit()
        train_seconds = time.perf_counter() - start
        del trainer
    else:
        log(f"trained earlier; evaluating {run_dir / 'final'}")

    model = load_model(run_dir / "final", device=device).eval()
    rows = read_metrics(run_dir)
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    result: dict[str, Any] = {
        "variant": variant, "seed": seed, "run_dir": str(run_dir),
        "d_ff": model.config.d_ff, "parameters": parameter_counts(model),
        "steps": rows[-1]["step"] if rows else None, "tokens": rows[-1]["tokens"] if rows else None,
        # median over logged windows: robust to the first (warm-up) window and to load spikes
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "train_seconds": train_seconds,
        "final_train_loss": rows[-1]["loss"] if rows else None,
        "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "best_val_loss": min(r["val_loss"] for r in val_rows) if val_rows else None,
        "math": None,
    }
    if config.ablation.eval_problems:
        result["math"] = _evaluate(config, model, run_config, run_dir, log)
        log(f"exact match {result['math']['accuracy']:.1%} on "
            f"{result['math']['n']} test problems ({result['math']['seconds']:.0f}s)")
    atomic_write_text(run_dir / RESULTS_NAME, json.dumps(result, indent=2) + "\n")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _evaluate(config: AblationConfig, model, run_config: RunConfig, run_dir: Path, log) -> dict[str, Any]:
    from polyglu.data.tokenizer import load_tokenizer
    from polyglu.eval.math import evaluate_math

    a = config.ablation
    tok_dir = run_dir / "final" / "tokenizer"
    tokenizer = load_tokenizer(tok_dir if tok_dir.is_dir() else run_config.data.tokenizer)
    start = time.perf_counter()
    out = evaluate_math(model, tokenizer, held_out_problems(config), chat=a.eval_chat,
                        max_new_tokens=a.eval_max_new_tokens, batch_size=a.eval_batch_size)
    seconds = time.perf_counter() - start
    with open(run_dir / "math_predictions.jsonl", "w") as f:
        for record in out["records"]:
            f.write(json.dumps(record) + "\n")
    easy = [r for r in out["records"] if r["difficulty"] in (1, 2)]
    return {"accuracy": out["accuracy"], "n": out["n"], "correct": out["correct"],
            "accuracy_easy": sum(r["correct"] for r in easy) / len(easy) if easy else None,
            "per_difficulty": {str(k): v for k, v in out["per_difficulty"].items()}, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# the whole ablation


def run_ablation(config: AblationConfig, device: str | None = None,
                 log: Callable[..., Any] = print) -> dict[str, Any]:
    """Train and score every variant × seed in turn (finished runs are read back), then report."""
    d_ffs = variant_d_ff(config)
    seeds = config.seeds()
    plan = [(v, s) for s in seeds for v in config.ablation.variants]
    start = time.perf_counter()
    for i, (variant, seed) in enumerate(plan, 1):
        size = f", d_ff {d_ffs[variant]} (matched)" if d_ffs[variant] else ""
        log(f"=== [{i}/{len(plan)}] {variant} seed {seed}{size} ({time.perf_counter() - start:.0f}s elapsed)")

        def run_log(*args, _prefix=f"[{variant} seed {seed}]", **kwargs):
            log(_prefix, *args, **kwargs)

        run_variant(config, variant, seed, d_ffs[variant], device=device, log=run_log)
    return report_ablation(config, log=log)


def collect_results(config: AblationConfig) -> list[dict[str, Any]]:
    """The results of the configured variants × seeds that are finished, in config order."""
    out = []
    for variant in config.ablation.variants:
        for seed in config.seeds():
            path = run_dir_of(config, variant, seed) / RESULTS_NAME
            if path.is_file():
                out.append(json.loads(path.read_text()))
    return out


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


def report_ablation(config: AblationConfig, log: Callable[..., Any] = print) -> dict[str, Any]:
    """Aggregate the finished runs into output_dir/results.json, results.md and loss_curves.png
    (results-matched.json, ... with `matched_params`)."""
    from polyglu.checkpoint import atomic_write_text

    a = config.ablation
    results = collect_results(config)
    rows = aggregate(results, a.variants, a.reference)
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
    report = {"config": config.to_dict(), "reference": a.reference, "summary": rows, "runs": results,
              "plot": str(plot_path) if plot_path else None}
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
    atomic_write_text(md_path, "\n".join(lines))
    log("\n" + markdown_table(rows, a.reference))
    log(f"\nreport: {md_path}, {json_path}" + (f", {plot_path}" if plot_path else ""))
    return report


# --------------------------------------------------------------------------------------------
# plot


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


def _zoom_to_second_half(axes) -> None:
    """Fit each panel's y-range to the curves after the first quarter of training, where the
    variants differ (the early, much higher losses leave the frame)."""
    for ax in axes:
        ys = [y for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())
              if x >= 0.25 * max(line.get_xdata())]
        if ys:
            low, high = min(ys), max(ys)
            ax.set_ylim(low * 0.97, high * 1.03)
