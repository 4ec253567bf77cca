"""polyglu eval-math MODEL_DIR --data FILE.jsonl [--chat|--plain] [--num-fewshot N] [--fewshot-data FILE]
[--limit N] [--output-jsonl FILE] [--json FILE] [--compile [MODE]]

Exact-match accuracy on GSM8K-format JSONL ({"question", "answer": "... #### n", optional "difficulty"}),
overall and per difficulty, with one JSONL record per problem (output, extracted answer, correctness).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polyglu.commands.common import add_compile_argument, add_quiet_argument, check_compile_argument
from polyglu.commands.generate import add_model_arguments

DEFAULT_MAX_NEW_TOKENS = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="GSM8K-format JSONL file (question, answer with '#### n')")
    style = p.add_mutually_exclusive_group()
    style.add_argument("--chat", dest="chat", action="store_true", default=True,
                       help="ChatML prompting: question as the user turn (default)")
    style.add_argument("--plain", dest="chat", action="store_false", help="'Question: ...\\nAnswer:' prompting")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot demonstrations per prompt (default 0)")
    p.add_argument("--fewshot-data", default=None,
                   help="JSONL of demonstrations (default: the first N problems of --data, then not evaluated)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {DEFAULT_MAX_NEW_TOKENS}, at most half the model context (the rest holds the prompt)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together (default 32)")
    add_compile_argument(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--output-jsonl", default=None, help="write one record per problem here")
    p.add_argument("--json", dest="json_path", default=None, help="write the summary (no records) as JSON here")
    add_quiet_argument(p)


def read_jsonl(path: str | Path, problems: bool = True) -> list[dict]:
    """Records of a JSONL file; errors name the file and line. With `problems`, each record must have a
    string 'question' and an 'answer' with a numeric final answer ('... #### 42', or a number)."""
    from polyglu.eval.math import reference_answer

    path = Path(path)
    records = []
    from polyglu.data.sources import check_text_start

    try:
        raw = check_text_start(path, path.read_bytes())
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start}); "
                         f"save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        if problems:
            if not isinstance(record.get("question"), str) or "answer" not in record:
                raise ValueError(f"{path} line {number}: expected fields 'question' (text) and 'answer' "
                                 f"(fields: {', '.join(map(str, record)) or 'none'})")
            if reference_answer(record) is None:
                raise ValueError(f"{path} line {number}: answer {str(record['answer'])[-60:]!r} has no numeric "
                                 f"final answer (expected '... #### 42' or a number)")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from polyglu.commands.common import load_inference_model, progress_disabled, progress_visible
    from polyglu.eval.math import evaluate_math

    _check_arguments(args)
    problems = read_jsonl(args.data)
    fewshot = read_jsonl(args.fewshot_data) if args.fewshot_data else None
    skip = args.num_fewshot if fewshot is None else 0  # demonstrations taken from --data come first
    if args.limit is not None:
        problems = problems[:skip + args.limit]
    model, tokenizer = load_inference_model(args)
    max_new_tokens = _max_new_tokens(args, model)
    quiet = progress_disabled(args)
    if args.compile and progress_visible(args):
        print("polyglu eval-math: compiling the decode step for each batch shape (seconds to minutes) ...",
              file=sys.stderr, flush=True)
    with tqdm(total=len(problems) - skip, desc="eval-math", unit="problem", disable=quiet) as bar:
        result = evaluate_math(model, tokenizer, problems, chat=args.chat, num_fewshot=args.num_fewshot,
                               fewshot_examples=fewshot, max_new_tokens=max_new_tokens,
                               batch_size=args.batch_size, system_prompt=args.system, progress=bar.update,
                               compile=args.compile)
    print(f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['n']})  "
          f"[{'chat' if args.chat else 'plain'}, {args.num_fewshot}-shot]")
    for difficulty, block in result["per_difficulty"].items():
        print(f"  difficulty {difficulty}: {block['accuracy']:.4f} ({block['correct']}/{block['n']})")
    _write_outputs(args, result)
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """The flags, before any work: positive counts, the output files (new, or an earlier output of
    eval-math; neither an input nor each other) and --fewshot-data not the evaluated file."""
    from polyglu.commands import CommandError
    from polyglu.commands.common import check_output_file, check_positive, json_with_keys, jsonl_with_keys

    check_positive(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit)
    check_compile_argument(args.compile)
    if args.num_fewshot < 0:
        raise CommandError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    inputs = (args.model, args.data, args.fewshot_data, args.tokenizer)
    check_output_file(args.output_jsonl, "--output-jsonl", inputs, previous=jsonl_with_keys("prediction", "correct"))
    check_output_file(args.json_path, "--json", inputs, previous=json_with_keys("accuracy", "model"))
    if args.output_jsonl and args.json_path and Path(args.output_jsonl).resolve() == Path(args.json_path).resolve():
        raise CommandError(f"--output-jsonl and --json are the same file {args.json_path}; give each its own")
    if args.fewshot_data and Path(args.fewshot_data).resolve() == Path(args.data).resolve():
        raise CommandError(f"--fewshot-data is the evaluated file {args.data}: demonstrations would include the "
                           f"problems scored; omit --fewshot-data (the first --num-fewshot problems of --data are "
                           f"then demonstrations and not scored) or name a training file")


def _max_new_tokens(args: argparse.Namespace, model) -> int:
    """--max-new-tokens, checked against the model's context; by default what the context leaves."""
    from polyglu.commands.common import default_max_new_tokens
    from polyglu.commands.generate import check_fits_context

    if args.max_new_tokens is None:
        return default_max_new_tokens(model.config.max_seq_len, cap=DEFAULT_MAX_NEW_TOKENS)
    check_fits_context(args.max_new_tokens, model)
    return args.max_new_tokens


def _write_outputs(args: argparse.Namespace, result: dict) -> None:
    """--output-jsonl (one record per problem) and --json (the summary with the run's settings)."""
    from polyglu.atomic import atomic_write_text, strict_json

    if args.output_jsonl:
        path = Path(args.output_jsonl)
        # built beside and renamed over: an interrupted run leaves the old file whole
        atomic_write_text(path, "".join(strict_json(r, indent=None, ensure_ascii=False) + "\n"
                                        for r in result["records"]))
        print(f"wrote {path}")
    if args.json_path:
        summary = {k: v for k, v in result.items() if k != "records"}
        summary["per_difficulty"] = {str(k): v for k, v in summary["per_difficulty"].items()}
        summary.update(model=str(args.model), data=str(args.data), chat=args.chat, num_fewshot=args.num_fewshot)
        atomic_write_text(args.json_path, strict_json(summary) + "\n")
        print(f"wrote {args.json_path}")
