"""The built-in math corpus: format, arithmetic, small numbers, copyable numbers, disjoint splits."""

import json
import random
import re

import pytest

from polyglu.data.synthetic import (
    TEMPLATES,
    Story,
    generate_problems,
    pretraining_text,
    split_of,
    write_builtin_math,
)

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _check(problem):
    lines = problem["answer"].split("\n")
    assert lines[-1] == f"#### {problem['final']}"
    assert len(lines) - 1 == problem["difficulty"]
    results = []
    for line in lines[:-1]:
        match = EQUATION.search(line)
        assert match, line
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c, line
        assert op != "/" or a % b == 0, line
        assert c >= 0
        results.append(c)
    assert results[-1] == int(problem["final"])
    return results


def test_every_template_gives_correct_worked_solutions():
    rng = random.Random(0)
    for difficulty, templates in TEMPLATES.items():
        for template in templates:
            for _ in range(40):
                question, lines, final = template(Story(rng))
                problem = {"question": question, "answer": "\n".join(lines) + f"\n#### {final}",
                           "final": str(final), "difficulty": difficulty}
                _check(problem)
                # every number of the question is copied verbatim into the solution
                answer_numbers = set(re.findall(r"\d+", problem["answer"]))
                for number in re.findall(r"\d+", question):
                    assert number in answer_numbers, (number, problem)


def test_generate_problems_format_and_small_numbers():
    problems = generate_problems("train", 400, seed=3)
    assert len(problems) == 400
    assert {p["difficulty"] for p in problems} == {1, 2, 3, 4}
    for p in problems:
        assert set(p) == {"question", "answer", "final", "difficulty"}
        results = _check(p)
        assert max(results) <= 999
        if p["difficulty"] <= 2:  # small numbers: at most 100 anywhere, and a one-digit fact first
            assert max(int(x) for x in re.findall(r"\d+", p["question"] + p["answer"])) <= 100, p
            a, op, b, _ = EQUATION.search(p["answer"]).groups()
            assert min(int(a), int(b)) <= 10 or op == "/", p
    assert len({p["question"] for p in problems}) == 400


def test_generation_is_seeded_and_splits_are_disjoint():
    assert generate_problems("test", 50, seed=1) == generate_problems("test", 50, seed=1)
    assert generate_problems("test", 50, seed=1) != generate_problems("test", 50, seed=2)
    train = {p["question"] for p in generate_problems("train", 1500)}
    validation = {p["question"] for p in generate_problems("validation", 150)}
    test = {p["question"] for p in generate_problems("test", 150)}
    assert not train & validation and not train & test and not validation & test
    assert all(split_of(q) == "test" for q in test)


def test_difficulty_selection_and_errors():
    easy = generate_problems("test", 30, difficulties=(1, 2))
    assert [p["difficulty"] for p in easy[:4]] == [1, 2, 1, 2]
    weighted = generate_problems("train", 200, difficulty_weights={1: 1.0, 4: 0.0})
    assert {p["difficulty"] for p in weighted} == {1}
    with pytest.raises(ValueError, match="unknown split"):
        generate_problems("dev", 3)
    with pytest.raises(ValueError, match="unknown difficulty"):
        generate_problems("train", 3, difficulties=(5,))


def test_write_builtin_math(tmp_path):
    paths = write_builtin_math(tmp_path, n_train=60, n_val=12, n_test=16, seed=0)
    assert set(paths) == {"pretrain_train", "pretrain_validation", "sft_train", "sft_validation", "test"}
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert len(rows["pretrain_train"]) == len(rows["sft_train"]) == 60
    assert len(rows["pretrain_validation"]) == 12 and len(rows["test"]) == 16
    first = rows["pretrain_train"][0]["text"]
    assert first.startswith("Question: ") and "\nAnswer: " in first and re.search(r"\n#### \d+$", first)
    chat = rows["sft_train"][0]["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert pretraining_text({"question": chat[0]["content"], "answer": chat[1]["content"]}) == first
    assert set(rows["test"][0]) == {"question", "answer", "final", "difficulty"}
    assert [r["difficulty"] for r in rows["test"][:4]] == [1, 2, 3, 4]
