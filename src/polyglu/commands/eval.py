"""polyglu eval MODEL_DIR --tasks T1,T2 [--num-fewshot N] [--limit N] [--include-path DIR] [--batch-size B]
[--output FILE] [--compile [MODE]]

Runs lm-evaluation-harness tasks (the optional `lm-eval` package) through the `polyglu` model adapter,
prints lm-eval's results table and writes the results as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polyglu.commands.common import add_compile_argument, check_compile_argument
from polyglu.commands.generate import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction when < 1; for quick checks, not reportable scores)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="directory of extra task YAMLs (repeatable)")
    p.add_argument("--only-include-path", action="store_true",
                   help="index only --include-path tasks, not lm-eval's built-in ones (faster, offline)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default 16)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="default generation length (default 256)")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts as ChatML turns")
    p.add_argument("--log-samples", action="store_true", help="include per-example samples in the JSON")
    p.add_argument("--bootstrap-iters", type=int, default=100_000,
                   help="bootstrap iterations for standard errors (0 skips them)")
    p.add_argument("--seed", type=int, default=1234)
    add_compile_argument(p)
    p.add_argument("--output", default=None, help="write the results JSON here")


def run(args: argparse.Namespace) -> int:
    from polyglu.commands import CommandError

    try:
        from lm_eval.utils import make_table

        from polyglu.eval.harness import PolygluLM, evaluate
    except ImportError as e:
        raise CommandError(f"polyglu eval needs lm-evaluation-harness: pip install 'polyglu[eval]' ({e})") from None
    from polyglu.atomic import atomic_write_text, strict_json
    from polyglu.commands.common import (
        check_output_file,
        check_positive,
        json_with_keys,
        load_inference_model,
    )

    check_positive(batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, limit=args.limit)
    check_compile_argument(args.compile)
    check_output_file(args.output, "--output", inputs=(args.model, args.tokenizer, *(args.include_path or [])),
                      previous=json_with_keys("results", "polyglu"))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CommandError("--tasks names no task")
    if args.only_include_path and not args.include_path:
        raise CommandError("--only-include-path needs --include-path DIR")
    for directory in args.include_path or []:
        if not Path(directory).is_dir():
            raise CommandError(f"--include-path {directory}: not a directory")
    model, tokenizer = load_inference_model(args)
    lm = PolygluLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                   seed=args.seed, compile=args.compile)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        results = evaluate(lm, tasks, num_fewshot=args.num_fewshot, limit=limit, include_path=args.include_path,
                           include_defaults=not args.only_include_path, apply_chat_template=args.apply_chat_template,
                           log_samples=args.log_samples, seed=args.seed, bootstrap_iters=args.bootstrap_iters)
    except KeyError as e:  # lm-eval's error for a task it does not know
        raise CommandError(f"unknown task {e} (see --include-path, or lm-eval's task list)") from None
    if results is None:
        return 0
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        path = Path(args.output)
        results = {k: v for k, v in results.items() if args.log_samples or k != "samples"}
        results["polyglu"] = {"model": str(args.model), "tasks": tasks}
        atomic_write_text(path, strict_json(results, default=str) + "\n")  # NaN stderr as null
        print(f"wrote {path}")
    return 0
