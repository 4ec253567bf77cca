"""Running an ablation: train (or resume, or read back) and score each variant x seed in turn."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polyglu.config_loader import ConfigError
from polyglu.train.ablation.config import AblationConfig
from polyglu.train.ablation.plan import RESULTS_NAME, variant_d_ff, variant_run_config
from polyglu.train.ablation.report import read_metrics, report_ablation
from polyglu.train.config import RunConfig
from polyglu.train.metrics import METRICS_NAME

SPEC_NAME = "ablation_spec.json"
# train keys that change neither the computation nor its results: free to differ on a resume
COSMETIC_TRAIN_KEYS = ("progress", "threads", "tensorboard", "wandb_project")


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
    from polyglu.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(spec, indent=2) + "\n")


def held_out_problems(config: AblationConfig) -> list[dict]:
    """The first `eval_problems` of the built-in corpus's held-out test split (disjoint from
    training by construction), generated from the data seed: the same problems for every run."""
    from polyglu.data.synthetic import generate_problems

    return generate_problems("test", config.ablation.eval_problems, seed=config.base.data.builtin_seed)


# (model, batches) -> per-layer routing summaries: the analysis layer's, handed in by the caller
# (`polyglu ablate` passes polyglu.analysis.stats), since training sits below the analysis
RoutingStats = Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]]


def validation_batches(run_config: RunConfig, n_batches: int, log: Callable[..., Any] = print
                       ) -> list[dict[str, Any]]:
    """The first `n_batches` validation batches of a pre-training run config, as its trainer reads them."""
    from polyglu.data.loader import PackedLoader
    from polyglu.data.tokenizer import load_tokenizer
    from polyglu.train.setup import builtin_data

    d, tc = run_config.data, run_config.train
    if d.sources:
        validation, tokenizer = dict(d.validation) or dict(d.sources), load_tokenizer(d.tokenizer)
        split = "train" if d.validation else "validation"
    else:
        builtin = builtin_data(run_config, log)
        validation, tokenizer, split = {"math": builtin["shards"]["validation"]}, builtin["tokenizer"], "validation"
    loader = PackedLoader(validation, d.seq_len, tc.batch_size, seed=tc.seed + 1, split=split, tokenizer=tokenizer)
    return [loader.get_batch(i) for i in range(n_batches)]


def run_variant(config: AblationConfig, variant: str, seed: int, d_ff: int | None = None,
                device: str | None = None, log: Callable[..., Any] = print,
                routing_stats: RoutingStats | None = None) -> dict[str, Any]:
    """Train (or resume, or read back) one variant × seed and score it; returns its results. With
    `routing_stats`, a PolyGLU variant's results also hold its per-layer routing on validation data."""
    import torch

    from polyglu.atomic import atomic_write_text
    from polyglu.loading import load_model

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

    train_seconds = _train_variant(run_config, run_dir, device, log)
    model = load_model(run_dir / "final", device=device).eval()
    result = _training_results(model, run_dir, variant, seed, train_seconds)
    if routing_stats is not None and model.polyglu_layers():
        batches = validation_batches(run_config, max(1, run_config.train.eval_batches), log)
        result["routing"] = routing_stats(model, batches)
    if config.ablation.eval_problems:
        result["math"] = _evaluate(config, model, run_config, run_dir, log)
        log(f"exact match {result['math']['accuracy']:.1%} on "
            f"{result['math']['n']} test problems ({result['math']['seconds']:.0f}s)")
    atomic_write_text(run_dir / RESULTS_NAME, json.dumps(result, indent=2) + "\n")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _train_variant(run_config: RunConfig, run_dir: Path, device: str, log: Callable[..., Any]) -> float | None:
    """Train the variant to its max_steps, resuming from its latest checkpoint; returns the seconds it
    took, or None when run_dir/final is already at max_steps (trained earlier, never scored)."""
    from polyglu.train import checkpointing as ckpt
    from polyglu.train.setup import build_run

    if _final_step(run_dir) == run_config.train.max_steps:
        log(f"trained earlier; evaluating {run_dir / 'final'}")
        return None
    if ckpt.latest_checkpoint(run_dir) is None and (run_dir / METRICS_NAME).is_file():
        (run_dir / METRICS_NAME).unlink()  # rows of an attempt that never reached a checkpoint
    trainer = build_run(run_config, device=device, log=log)
    trainer.resume()
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def _training_results(model, run_dir: Path, variant: str, seed: int, train_seconds: float | None) -> dict[str, Any]:
    """A variant's results from its trained model and metrics rows (size, steps, speed, losses), with
    "math" and "routing" still None."""
    from polyglu.model.parameters import parameter_counts

    rows = read_metrics(run_dir)
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return {
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
        "routing": None,
    }


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


def run_ablation(config: AblationConfig, device: str | None = None,
                 log: Callable[..., Any] = print, routing_stats: RoutingStats | None = None) -> dict[str, Any]:
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

        run_variant(config, variant, seed, d_ffs[variant], device=device, log=run_log, routing_stats=routing_stats)
    return report_ablation(config, log=log)
