"""polyglu ablate --config configs/ablation-tiny.yaml [--seeds N] [--variants a,b] [--matched-params]
[--out DIR] [--report-only] [key=value ...]

Trains PolyGLU, its routing ablations and the single-activation GLU baselines from one base run
config (same data order, tokens, optimiser, schedules), one run after another, resumable; then
writes results.json, results.md and loss_curves.png to the ablation's output directory.
"""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "ablation-tiny.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polyglu.train.ablation import VARIANTS

    p.add_argument("--config", default=None,
                   help=f"ablation config: a `base` run config plus an `ablation` section (default configs/{DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. base.train.max_steps=50 ablation.eval_problems=100")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (ablation.seeds)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (ablation.variants)")
    p.add_argument("--matched-params", action="store_true",
                   help="shrink d_ff of the PolyGLU variants to the reference's total parameters "
                        "(their runs go to <variant>-matched/, the baselines are shared)")
    p.add_argument("--out", default=None, help="output directory (ablation.output_dir)")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def routing_summary(model, batches) -> list[dict]:
    """Per-layer validation routing of a trained variant: entropy at its tau and at tau = 1,
    agreement, variance split (polyglu.analysis.stats)."""
    from polyglu.analysis.stats import dynamic_routing_stats, summarize_layers

    return summarize_layers(dynamic_routing_stats(model, batches))


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from polyglu.commands import CommandError
    from polyglu.config_loader import bundled_configs_dir
    from polyglu.train.ablation import AblationConfig, report_ablation, run_ablation
    from polyglu.train.trainer import TrainingError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CommandError("polyglu ablate runs in one process (one device); start it without torchrun")
    path = Path(args.config) if args.config else bundled_configs_dir() / DEFAULT_CONFIG
    if not path.is_file():
        raise CommandError(f"ablation config {path} not found (pass --config)")
    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"ablation.seeds={args.seeds}")
    if args.variants is not None:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        overrides.append(f"ablation.variants=[{','.join(names)}]")
    if args.matched_params:
        overrides.append("ablation.matched_params=true")
    config = AblationConfig.load(path, overrides)
    if args.out is not None:
        config.ablation.output_dir = args.out

    def log(*a, **k):
        print(*a, **k, flush=True)

    if args.report_only:
        report_ablation(config, log=log)
        return 0
    try:
        run_ablation(config, device=args.device, log=log, routing_stats=routing_summary)
    except TrainingError as e:
        raise CommandError(str(e)) from None
    return 0
