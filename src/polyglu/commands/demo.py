"""polyglu demo: the whole pipeline on the built-in math corpus, offline, on a CPU in minutes.

corpus -> BPE tokenizer -> token shards -> pre-training -> ChatML fine-tuning -> exact-match
evaluation on held-out problems (greedy, KV cache) next to an untrained model and a
most-frequent-answer baseline -> routing report. Everything lands in the run directory.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

DEFAULT_PRETRAIN = "demo.yaml"
DEFAULT_SFT = "demo-sft.yaml"
FINE_TUNED = "PolyGLU fine-tuned (chat)"  # the results row of the fine-tuned model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="runs/demo", help="where everything is written (default runs/demo)")
    p.add_argument("--config", default=None, help=f"pre-training config (default configs/{DEFAULT_PRETRAIN})")
    p.add_argument("--sft-config", default=None, help=f"fine-tuning config (default configs/{DEFAULT_SFT})")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override train.max_steps of pre-training")
    p.add_argument("--sft-steps", type=int, default=None, help="override train.max_steps of fine-tuning")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test problems only")
    p.add_argument("--samples", type=int, default=3, help="sample solutions to print")
    p.add_argument("--no-report", action="store_true", help="skip the routing analysis report")
    p.add_argument("--fresh", action="store_true", help="retrain even if the run directory has finished stages")


def most_frequent_answer_baseline(train: list[dict], test: list[dict]) -> dict:
    """Always answer the training set's most frequent final answer (per difficulty)."""
    from polyglu.eval.math import reference_answer

    by_difficulty: dict = {}
    for p in train:
        by_difficulty.setdefault(p.get("difficulty"), Counter())[reference_answer(p)] += 1
    overall = Counter(reference_answer(p) for p in train).most_common(1)[0][0]
    result: dict = {}
    for p in test:
        guess = by_difficulty.get(p.get("difficulty"), Counter({overall: 1})).most_common(1)[0][0]
        block = result.setdefault(p.get("difficulty"), {"correct": 0, "n": 0})
        block["n"] += 1
        block["correct"] += int(guess == reference_answer(p))
    for block in result.values():
        block["accuracy"] = block["correct"] / block["n"]
    n = sum(b["n"] for b in result.values())
    return {"accuracy": sum(b["correct"] for b in result.values()) / max(n, 1), "n": n, "per_difficulty": result}


# model fields that make another model: a finished stage saved with other values is trained again
_SHAPE_FIELDS = ("d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn", "activations",
                 "gate_hidden", "routing_pool", "routing_scope")


def _stale(meta: dict, steps: int, model: dict) -> str | None:
    """Why a finished stage (its final/config.json `meta`) cannot be reused for `steps` steps of a
    model with the fields `model`, or None if it can."""
    if meta.get("step") != steps:
        return f"it ran {meta.get('step')} steps, not {steps}"
    saved = meta.get("model") or {}
    changed = [k for k in _SHAPE_FIELDS if json.dumps(saved.get(k)) != json.dumps(model.get(k))]
    if changed:
        return "its model differs in " + ", ".join(f"{k} ({saved.get(k)} -> {model.get(k)})" for k in changed)
    return None


def _stage(run_dir: Path, config_path: Path, task: str, steps: int | None, fresh: bool, log) -> tuple[Path, bool]:
    """Train one stage, or reuse it when it finished with the same steps and model shape (the
    pre-trained model's for fine-tuning). Returns (its final model directory, whether it trained)."""
    from polyglu import hardware
    from polyglu.train.config import RunConfig
    from polyglu.train.setup import build_run

    stage_dir = run_dir / ("pretrain" if task == "pretrain" else "sft")
    overrides = [f"run_dir={stage_dir}", f"data.builtin_dir={run_dir / 'data'}"]
    if task == "sft":
        overrides.append(f"init_from={run_dir / 'pretrain' / 'final'}")
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    config = RunConfig.load(config_path, overrides, task=task)
    hardware.apply_threads(config.train.threads)  # also for the evaluation, even when the stages are reused
    done = stage_dir / "final" / "config.json"
    if done.is_file() and not fresh:
        model = (config.model_config().to_dict() if task == "pretrain" else
                 json.loads((run_dir / "pretrain" / "final" / "config.json").read_text()).get("model") or {})
        why = _stale(json.loads(done.read_text()), config.train.max_steps, model)
        if why is None:
            log(f"[{task}] already finished in {stage_dir} (use --fresh to redo)")
            return stage_dir / "final", False
        log(f"[{task}] {stage_dir} is not reused: {why}; training it again")
        fresh = True
    trainer = build_run(config, log=log, overwrite=fresh)  # --fresh replaces an earlier stage's results
    if not fresh:
        trainer.resume()
    start = time.perf_counter()
    summary = trainer.fit()
    last = summary["last"]
    log(f"[{task}] {summary['step']} steps, {summary['tokens']:,} tokens in {time.perf_counter() - start:.0f}s; "
        f"loss {last.get('loss', float('nan')):.3f}, val_loss {summary['best_val_loss'] or float('nan'):.3f}")
    return Path(summary["model_dir"]), True


def _build_kernels_in_background():
    """Training (the fused kernel and routing network, polyglu.model.fused_native) and the evaluation
    (decoding) run the native CPU kernels (polyglu.model.native): when they are not built yet,
    compile them now, in a compiler process, while the tokenizer and the data are prepared, rather
    than at the first training step (~15 s). Returns the thread to join, or None."""
    import threading

    from polyglu.model import native

    if native.mode() == "off" or native.library_path().exists():
        return None

    def build():
        try:
            native.build()
        except Exception:  # the evaluation's first use reports it (one warning) and decodes eagerly
            pass

    thread = threading.Thread(target=build, name="polyglu-kernels", daemon=True)
    thread.start()
    return thread


def _accuracy_table(rows: dict[str, dict]) -> str:
    difficulties = sorted({d for r in rows.values() for d in r["per_difficulty"]}, key=str)
    head = f"{'model':<28}" + "".join(f"{'d=' + str(d):>9}" for d in difficulties) + f"{'1-2 step':>10}{'all':>8}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        pd = r["per_difficulty"]
        easy = [pd[d] for d in difficulties if str(d) in ("1", "2") and d in pd]
        easy_acc = sum(b["correct"] for b in easy) / max(1, sum(b["n"] for b in easy))
        cells = "".join(f"{100 * pd[d]['accuracy']:>8.1f}%" if d in pd else f"{'-':>9}" for d in difficulties)
        lines.append(f"{name:<28}{cells}{100 * easy_acc:>9.1f}%{100 * r['accuracy']:>7.1f}%")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from polyglu import hardware
    from polyglu.data.tokenizer import load_tokenizer

    def log(*a, **k):
        print(*a, **k, flush=True)

    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    pre_cfg, sft_cfg = _stage_configs(args)
    hardware.choose_threads()  # an automatic choice is made once, before the kernel compiler loads the machine
    kernels_build = _build_kernels_in_background()
    _, pretrained = _stage(run_dir, pre_cfg, "pretrain", args.pretrain_steps, args.fresh, log)
    # a fine-tuned model of an earlier pre-training is not reused
    sft_dir, _ = _stage(run_dir, sft_cfg, "sft", args.sft_steps, args.fresh or pretrained, log)
    if kernels_build is not None:
        kernels_build.join()

    files, train, test = _demo_problems(run_dir, args.eval_limit)
    tokenizer = load_tokenizer(sft_dir / "tokenizer")
    eval_start = time.perf_counter()
    results = _evaluate(sft_dir, tokenizer, train, test, log)
    log("")
    log(_accuracy_table(results))
    log("")
    for record in results[FINE_TUNED]["records"][:args.samples]:
        mark = "correct" if record["correct"] else f"wrong (expected {record['reference']})"
        log(f"Q: {record['question']}\nA: {record['output'].strip()}\n-> {mark}\n")
    _write_results(run_dir, results)
    log(f"evaluation took {time.perf_counter() - eval_start:.0f}s")
    if not args.no_report:
        _routing_report(sft_dir, files["pretrain_validation"], run_dir, log)
    log(f"done in {time.perf_counter() - t0:.0f}s; everything is in {run_dir}/ "
        f"(results.json, predictions.jsonl, pretrain/, sft/)")
    return 0


def _stage_configs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The pre-training and fine-tuning configs: --config/--sft-config, else the bundled demo configs."""
    from polyglu.config_loader import bundled_configs_dir

    configs = bundled_configs_dir()
    pre_cfg = Path(args.config) if args.config else configs / DEFAULT_PRETRAIN
    sft_cfg = Path(args.sft_config) if args.sft_config else configs / DEFAULT_SFT
    for path in (pre_cfg, sft_cfg):
        if not path.is_file():
            from polyglu.commands import CommandError

            raise CommandError(f"config {path} not found (pass --config/--sft-config)")
    return pre_cfg, sft_cfg


def _demo_problems(run_dir: Path, eval_limit: int | None) -> tuple[dict[str, Path], list[dict], list[dict]]:
    """The built-in corpus the stages prepared: its files by role, the training problems (answer and
    difficulty, for the most-frequent-answer baseline) and the held-out test problems (the first
    `eval_limit` with one)."""
    shards = run_dir / "data" / "shards"
    files = {k: shards / v for k, v in json.loads((shards / "manifest.json").read_text())["builtin"]["files"].items()}
    test = [json.loads(line) for line in files["test"].read_text().splitlines() if line.strip()]
    train_rows = [json.loads(line) for line in files["sft_train"].read_text().splitlines()[:20000]]
    train = [{"answer": r["messages"][-1]["content"], "difficulty": r.get("difficulty")} for r in train_rows]
    if eval_limit:
        test = test[:eval_limit]
    return files, train, test


def _evaluate(sft_dir: Path, tokenizer, train: list[dict], test: list[dict], log) -> dict[str, dict]:
    """Exact-match results of the fine-tuned model, an untrained model of its shape (first 100
    problems) and the most-frequent-answer baseline, by row name of the accuracy table."""
    import torch

    from polyglu.eval.math import evaluate_math
    from polyglu.loading import load_model
    from polyglu.model.transformer import PolychromaticLM

    log(f"evaluating on {len(test)} held-out problems (greedy decoding, KV cache)")
    results = {}
    fine_tuned = load_model(sft_dir)
    results[FINE_TUNED] = evaluate_math(fine_tuned, tokenizer, test, chat=True, max_new_tokens=160, batch_size=64)
    torch.manual_seed(0)
    untrained = PolychromaticLM(fine_tuned.config).eval()
    results["untrained (chat)"] = evaluate_math(untrained, tokenizer, test[:100], chat=True, max_new_tokens=32,
                                                batch_size=64)
    results["most frequent answer"] = most_frequent_answer_baseline(train, test)
    return results


def _write_results(run_dir: Path, results: dict[str, dict]) -> None:
    """run_dir/results.json (every row's accuracies) and run_dir/predictions.jsonl (the fine-tuned
    model's record per problem)."""
    summary = {name: {k: v for k, v in r.items() if k != "records"} for name, r in results.items()}
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with open(run_dir / "predictions.jsonl", "w") as f:
        for record in results[FINE_TUNED]["records"]:
            f.write(json.dumps(record) + "\n")


def _routing_report(sft_dir: Path, validation: Path, run_dir: Path, log) -> None:
    """run_dir/report: the fine-tuned model's routing on the pre-training validation text, and its
    evolution over the pre-training checkpoints; skipped (one line) when it cannot be made."""
    # 4096 tokens (~45 problems) are enough to show the routing; it costs seconds
    try:
        from polyglu.analysis.pipeline import analyze_to_directory

        analyze_to_directory(sft_dir, {"math": str(validation)}, run_dir / "report",
                             run_dir=run_dir / "pretrain", max_tokens=4096, evolution_tokens=1024, seq_len=256)
    # matplotlib missing, or bad inputs (the errors `polyglu analyze` reported while the demo went on)
    except (ImportError, ValueError, FileNotFoundError) as e:
        log(f"routing report skipped ({e})")
