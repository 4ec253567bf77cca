"""Exact-match evaluation on GSM8K-format problems: {"question", "answer" ending in "#### n", optional
"difficulty"}.

Prompting:
- chat (default): ChatML, the question as the user turn, generation from the assistant turn, stopping
  at <|im_end|> / EOS. Few-shot examples are earlier user/assistant turns.
- plain: "Question: ...\\nAnswer:" blocks separated by a blank line; generation stops at the next
  "Question:".

The predicted answer is the number after the last "####" of the output (fallback: its last number);
the reference is read the same way from "answer". Numbers are compared exactly as rationals after
removing commas and currency signs, so "1,000" == "1000.00".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from polyglu.data.chat import render_chatml
from polyglu.data.special_tokens import EOS_TOKEN, IM_END

_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_FINAL = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)
PLAIN_STOP = ("Question:",)


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.50'; None when it is not a number."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return text


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the number after the last '####', else the last number."""
    finals = _FINAL.findall(text)
    candidates = finals or _ANY.findall(text)
    for candidate in reversed(candidates):
        number = normalize_number(candidate)
        if number is not None:
            return number
    return None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None:
        return False
    return Fraction(predicted) == Fraction(reference)


def reference_answer(problem: dict) -> str | None:
    answer = problem["answer"]
    if isinstance(answer, (int, float)):
        return normalize_number(str(answer))
    return extract_answer(str(answer))


def build_prompt(question: str, *, chat: bool = True, examples: Sequence[dict] = (),
                 system_prompt: str | None = None) -> str:
    """The prompt for one problem, with `examples` ({question, answer}) as few-shot demonstrations."""
    if chat:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for ex in examples:
            messages += [{"role": "user", "content": ex["question"]},
                         {"role": "assistant", "content": str(ex["answer"])}]
        messages.append({"role": "user", "content": question})
        return render_chatml(messages, add_generation_prompt=True)
    shots = "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n" for ex in examples)
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}{shots}Question: {question}\nAnswer:"


def _stops(tokenizer, chat: bool) -> tuple[list[int], list[str]]:
    """The token ids and strings that end a solution: EOS (and <|im_end|> in chat), the next block in plain mode."""
    stop_ids = [tokenizer.eos_id]
    im_end = tokenizer.token_id(IM_END) if hasattr(tokenizer, "token_id") else None
    if chat and im_end is not None:
        stop_ids.append(im_end)
    return stop_ids, [IM_END, EOS_TOKEN] if chat else [*PLAIN_STOP, IM_END, EOS_TOKEN]


def evaluate_math(model, tokenizer, problems: Sequence[dict], *, chat: bool = True, num_fewshot: int = 0,
                  fewshot_examples: Sequence[dict] | None = None, max_new_tokens: int = 256,
                  batch_size: int = 32, temperature: float = 0.0, seed: int | None = 0,
                  system_prompt: str | None = None,
                  progress: Callable[[int], object] | None = None, compile: bool | str = False) -> dict:
    """Generate a solution for each problem and score its final answer by exact match.

    Few-shot demonstrations are the first `num_fewshot` of `fewshot_examples` (default: of
    `problems`, which are then not evaluated themselves). Prompts longer than the context keep their
    last tokens. Returns {accuracy, n, correct, per_difficulty: {d: {accuracy, n, correct}},
    records: [{index, question, reference, prediction, correct, output, difficulty,
    prompt_tokens, generated_tokens, finished}]}. `compile`: decode through torch.compile
    (`polyglu.inference.generate`); batches share compiled steps (one per batch size).
    """
    from polyglu.inference import generate

    problems = list(problems)
    if fewshot_examples is None and num_fewshot:
        fewshot_examples, problems = problems[:num_fewshot], problems[num_fewshot:]
        first_index = num_fewshot
    else:
        first_index = 0
    examples = list(fewshot_examples or [])[:num_fewshot]
    if len(examples) < num_fewshot:
        raise ValueError(f"num_fewshot={num_fewshot} but only {len(examples)} few-shot examples available")
    for i, p in enumerate(problems):
        if "question" not in p or "answer" not in p:
            raise ValueError(f"problem {first_index + i} lacks 'question' or 'answer' (keys: {sorted(p)})")

    stop_ids, stop_strings = _stops(tokenizer, chat)
    max_prompt = model.config.max_seq_len - max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model context "
                         f"max_seq_len={model.config.max_seq_len}")

    encoded = [tokenizer.encode(build_prompt(p["question"], chat=chat, examples=examples,
                                             system_prompt=system_prompt))[-max_prompt:] for p in problems]
    # longest first: similar lengths share a batch, so little padding
    order = sorted(range(len(problems)), key=lambda i: -len(encoded[i]))
    outputs: dict[int, tuple[str, int, bool]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        out = generate(model, [encoded[i] for i in batch], max_new_tokens, temperature=temperature, seed=seed,
                       eos_token_id=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer, compile=compile)
        for row, i in enumerate(batch):
            outputs[i] = (out.texts[row], int(out.lengths[row]), bool(out.finished[row]))
        if progress is not None:
            progress(len(batch))

    records = []
    for i, problem in enumerate(problems):
        text, n_generated, finished = outputs[i]
        reference = reference_answer(problem)
        prediction = extract_answer(text)
        records.append({"index": first_index + i, "question": problem["question"], "reference": reference,
                        "prediction": prediction, "correct": answers_match(prediction, reference),
                        "output": text, "difficulty": problem.get("difficulty"),
                        "prompt_tokens": len(encoded[i]), "generated_tokens": n_generated, "finished": finished})
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Accuracy overall and per difficulty from per-problem records."""
    def block(rs: list[dict]) -> dict:
        correct = sum(r["correct"] for r in rs)
        return {"accuracy": correct / len(rs) if rs else 0.0, "n": len(rs), "correct": correct}

    groups: dict = {}
    for r in records:
        if r.get("difficulty") is not None:
            groups.setdefault(r["difficulty"], []).append(r)
    per_difficulty = {d: block(groups[d]) for d in sorted(groups, key=lambda d: (str(type(d)), d))}
    return {**block(records), "per_difficulty": per_difficulty, "records": records}
