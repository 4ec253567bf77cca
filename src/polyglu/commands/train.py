"""polyglu train --config FILE [key=value ...] [--resume | --overwrite]   (also `polyglu sft`)"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

TASK = "pretrain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML/JSON run config (sections model, data, train)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.max_steps=20 run_dir=runs/x model.d_ff=512")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in run_dir from its latest complete checkpoint (the config may "
                            "change only in settings that keep its results: max_steps, logging/eval/checkpoint "
                            "cadence, ...)")
    start.add_argument("--overwrite", action="store_true",
                       help="run_dir holds an earlier run: delete its results (run_config.json, metrics.jsonl, "
                            "checkpoints/, final/) and start again")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (train.progress=false; the bar shows only on a terminal anyway)")


def resume_command(args: argparse.Namespace, verb: str) -> str:
    parts = ["polyglu", verb] + (["--config", args.config] if args.config else []) + list(args.overrides)
    if args.device:
        parts += ["--device", args.device]
    if getattr(args, "quiet", False):
        parts.append("--quiet")
    return shlex.join([*parts, "--resume"])


def run(args: argparse.Namespace, task: str = TASK) -> int:
    from polyglu.commands import CommandError
    from polyglu.train.config import RunConfig
    from polyglu.train.setup import build_run
    from polyglu.train.trainer import TrainingError, TrainingInterrupted

    verb = "train" if task == TASK else "sft"
    # the verb decides the task: `polyglu sft --config any.yaml` fine-tunes
    quiet = ["train.progress=false"] if args.quiet else []
    config = RunConfig.load(args.config, [*args.overrides, *quiet, f"task={task}"])
    if args.config is None and not args.overrides:
        print(f"no --config: the defaults, preset {config.model.get('preset', '-')} on the built-in math corpus "
              f"({config.data.tokenizer} tokenizer, {config.train.max_steps} steps, batch {config.train.batch_size} "
              f"x {config.data.seq_len}) in {config.run_dir}; configs/debug.yaml is a 40-step run")
    trainer = build_run(config, device=args.device, resume=args.resume, overwrite=args.overwrite)
    try:
        if args.resume:
            trainer.resume()
        summary = trainer.fit()
    except TrainingError as e:
        raise CommandError(str(e)) from None
    except TrainingInterrupted as e:
        if trainer.dist.is_main:
            print(f"polyglu {verb}: interrupted at step {e.step} by {e.signal}: checkpoint saved in {e.checkpoint}; "
                  f"resume with: {resume_command(args, verb)}", file=sys.stderr)
        return 128 + signal.Signals[e.signal].value  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        trainer.run_lock.release()
        trainer.dist.close()
    if trainer.dist.is_main:
        last = summary["last"]
        val = f", val_loss {summary['best_val_loss']:.4f} (best)" if summary["best_val_loss"] is not None else ""
        print(f"done: step {summary['step']}, {summary['tokens']:,} tokens, loss {last.get('loss', float('nan')):.4f}"
              f"{val}; model: {summary['model_dir']}")
    return 0
