"""polyglu train --config FILE [key=value ...] [--resume]   (also `polyglu sft`)"""

from __future__ import annotations

import argparse

TASK = "pretrain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML/JSON run config (sections model, data, train)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.max_steps=20 run_dir=runs/x model.d_ff=512")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in run_dir")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def run(args: argparse.Namespace, task: str = TASK) -> int:
    from polyglu.config import RunConfig
    from polyglu.train.setup import build_run
    from polyglu.train.trainer import TrainingError

    # the verb decides the task: `polyglu sft --config any.yaml` fine-tunes
    config = RunConfig.load(args.config, [*args.overrides, f"task={task}"])
    trainer = build_run(config, device=args.device)
    if args.resume:
        trainer.resume()
    try:
        summary = trainer.fit()
    except TrainingError as e:
        from polyglu.commands import CommandError

        raise CommandError(str(e)) from None
    finally:
        trainer.dist.close()
    if trainer.dist.is_main:
        last = summary["last"]
        val = f", val_loss {summary['best_val_loss']:.4f} (best)" if summary["best_val_loss"] is not None else ""
        print(f"done: step {summary['step']}, {summary['tokens']:,} tokens, loss {last.get('loss', float('nan')):.4f}"
              f"{val}; model: {summary['model_dir']}")
    return 0
