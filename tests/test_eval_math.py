import json
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from polyglu.cli import main
from polyglu.config import ModelConfig
from polyglu.data.chat import render_chatml
from polyglu.data.tokenizer import load_tokenizer
from polyglu.documents import PADDING_DOCUMENT
from polyglu.eval.math import answers_match, build_prompt, evaluate_math, extract_answer
from polyglu.model.transformer import ModelOutput, PolychromaticLM

TOKENIZER = load_tokenizer("byte")


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("Tom had 1,200 apples.\n#### 1,200", "1200"),
    ("#### $12.50.", "12.50"),
    ("first #### 3 then #### -4", "-4"),
    ("The answer is 18.", "18"),  # fallback: the last number
    ("costs 5 dollars, so 5 * 3 = 15", "15"),
    ("no number here", None),
    ("####", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_compare_as_numbers():
    assert answers_match("1000", extract_answer("#### 1,000.00"))
    assert answers_match("0.5", ".5")
    assert not answers_match("7", "7.01")
    assert not answers_match(None, "3")


@pytest.fixture(autouse=True)
def scripted_cache(monkeypatch):
    """The engine allocates a ScriptedLM's cache with the stand-in's own `new_cache`."""
    import polyglu.inference.engine as engine

    real = engine.new_cache
    monkeypatch.setattr(engine, "new_cache", lambda model, b, n: model.new_cache(b, n)
                        if isinstance(model, ScriptedLM) else real(model, b, n))


class ScriptedLM(nn.Module):
    """A stand-in model that answers each question with a fixed reply, one byte per step.

    It implements what `polyglu.generate` uses (config, device, forward with a cache and
    logits_to_keep, decode_step) with a cache of its own (`scripted_cache`, which the engine's
    allocation hands it), and records the prompts it was given.
    """

    def __init__(self, replies: dict[str, str], max_seq_len: int = 512) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=TOKENIZER.vocab_size, max_seq_len=max_seq_len, eos_token_id=None,
                                      pad_token_id=None, causal_routing=True)
        self.embed_tokens = nn.Embedding(1, 1)
        self.layers = nn.ModuleList()
        self.lm_head = nn.Identity()  # hidden states are already one-hot logits
        self.replies = replies
        self.prompts: list[str] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def new_cache(self, batch_size: int, max_len: int):
        queues = SimpleNamespace(rows=None)
        queues.reorder = lambda index: setattr(queues, "rows", [queues.rows[i] for i in index.tolist()])
        return queues

    def forward(self, input_ids, doc_ids=None, *, cache=None, compute_logits=True, logits_to_keep=0):
        if cache.rows is None:  # prefill: pick each row's reply from the last question in its prompt
            cache.rows = []
            for b in range(input_ids.shape[0]):
                ids = input_ids[b] if doc_ids is None else input_ids[b][doc_ids[b] != PADDING_DOCUMENT]
                prompt = TOKENIZER.decode(ids.tolist())
                self.prompts.append(prompt)
                question = max(self.replies, key=lambda q: prompt.rfind(q))
                cache.rows.append(TOKENIZER.encode(self.replies[question]) + [TOKENIZER.eos_id])
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b, queue in enumerate(cache.rows):
            logits[b, -1, queue.pop(0) if queue else TOKENIZER.eos_id] = 1.0
        return ModelOutput(logits=logits, hidden_states=logits)

    def decode_step(self, token_ids, cache):
        return self(token_ids, cache=cache).logits[:, -1]


PROBLEMS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5", "difficulty": 1},
    {"question": "Tom has 600 apples and buys 600 more. How many?", "answer": "600 + 600 = 1200\n#### 1,200",
     "difficulty": 2},
    {"question": "What is 3 + 4?", "answer": "#### 7", "difficulty": 2},
    {"question": "What is 2 - 5?", "answer": "#### -3", "difficulty": 1},
]
REPLIES = {
    "What is 2 + 3?": "2 + 3 = 5\n#### 5",
    "Tom has 600 apples and buys 600 more. How many?": "He has 1,200 apples.",  # no '####': last number
    "What is 3 + 4?": "3 + 4 = 8\n#### 8",  # wrong
    "What is 2 - 5?": "#### -3<|im_end|>\n#### 9",  # stops at <|im_end|>
}


def test_evaluate_math_chat_scores_and_records():
    model = ScriptedLM(REPLIES)
    result = evaluate_math(model, TOKENIZER, PROBLEMS, batch_size=3)
    assert (result["accuracy"], result["n"], result["correct"]) == (0.75, 4, 3)
    assert result["per_difficulty"] == {1: {"accuracy": 1.0, "n": 2, "correct": 2},
                                        2: {"accuracy": 0.5, "n": 2, "correct": 1}}
    records = result["records"]
    assert [r["prediction"] for r in records] == ["5", "1200", "8", "-3"]
    assert [r["reference"] for r in records] == ["5", "1200", "7", "-3"]
    assert [r["correct"] for r in records] == [True, True, False, True]
    assert records[3]["output"] == "#### -3" and records[3]["finished"]
    assert {"index", "question", "output", "difficulty", "prompt_tokens", "generated_tokens"} <= set(records[0])
    # the demo's contract: the chat prompt is the question as a single ChatML user turn
    expected = render_chatml([{"role": "user", "content": PROBLEMS[0]["question"]}], add_generation_prompt=True)
    assert expected in model.prompts


def test_evaluate_math_plain_few_shot():
    replies = {**REPLIES, "What is 3 + 4?": " 7\n\nQuestion: What is 1 + 1?\nAnswer: 2"}
    model = ScriptedLM(replies)
    result = evaluate_math(model, TOKENIZER, PROBLEMS, chat=False, num_fewshot=1)
    assert result["n"] == 3 and [r["index"] for r in result["records"]] == [1, 2, 3]
    assert result["records"][1]["output"] == " 7\n\n"  # cut at the next "Question:"
    assert result["records"][1]["correct"]
    expected = ("Question: What is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5\n\n"
                "Question: What is 3 + 4?\nAnswer:")
    assert expected in model.prompts
    assert build_prompt("Q?", chat=False) == "Question: Q?\nAnswer:"
    chat = build_prompt("Q?", examples=[{"question": "A?", "answer": "#### 1"}], system_prompt="Be brief.")
    assert chat == render_chatml([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"},
                                  {"role": "assistant", "content": "#### 1"}, {"role": "user", "content": "Q?"}],
                                 add_generation_prompt=True)


def test_evaluate_math_errors():
    model = ScriptedLM(REPLIES, max_seq_len=64)
    with pytest.raises(ValueError, match="lacks 'question' or 'answer'"):
        evaluate_math(model, TOKENIZER, [{"question": "x"}])
    with pytest.raises(ValueError, match="no room"):
        evaluate_math(model, TOKENIZER, PROBLEMS, max_new_tokens=64)


def tiny_model() -> PolychromaticLM:
    torch.manual_seed(0)
    config = ModelConfig.from_preset("debug", vocab_size=260, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2,
                                     head_dim=8, max_seq_len=128, gate_hidden=8)
    return PolychromaticLM(config).eval()


def test_evaluate_math_with_a_real_model_and_long_prompts():
    problems = [{**p, "question": p["question"] * (10 if i == 0 else 1)} for i, p in enumerate(PROBLEMS)]
    result = evaluate_math(tiny_model(), TOKENIZER, problems, max_new_tokens=12, batch_size=2)
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    # the overlong prompt kept its last tokens (the question's end and the assistant header)
    assert result["records"][0]["prompt_tokens"] == 128 - 12
    assert all(r["generated_tokens"] <= 12 for r in result["records"])


def test_evaluate_math_compiled_equals_eager_and_batches_share_a_cache_length(monkeypatch):
    """compile= reaches generate; batches of different prompt lengths get one bucketed cache length, so
    they share one compiled step and one cache ("eager": torch.compile's capture-only backend, seconds)."""
    import polyglu.inference.engine as engine

    lengths = []
    model = tiny_model()
    new_cache = engine.new_cache
    monkeypatch.setattr(engine, "new_cache", lambda m, b, n: lengths.append(n) or new_cache(m, b, n))
    monkeypatch.setattr(engine, "_CACHES", engine.weakref.WeakKeyDictionary())  # no cache kept from before
    problems = [{**p, "question": p["question"] * (1 + 2 * i)} for i, p in enumerate(PROBLEMS)]
    eager = evaluate_math(model, TOKENIZER, problems, max_new_tokens=6, batch_size=2)
    eager_lengths, lengths[:] = list(lengths), []
    compiled = evaluate_math(model, TOKENIZER, problems, max_new_tokens=6, batch_size=2, compile="eager")
    assert len(set(eager_lengths)) == 2  # two batches, two prompt lengths
    # the context (128) caps the 256-slot bucket; the second batch reuses the first batch's cache
    assert lengths == [128]
    assert [r["output"] for r in compiled["records"]] == [r["output"] for r in eager["records"]]


def test_cli_eval_math_compile_flag_reaches_generate(tmp_path, capsys, monkeypatch):
    import polyglu.inference as generation

    directory = tmp_path / "model"
    tiny_model().save_pretrained(directory)
    TOKENIZER.save(directory / "tokenizer")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    seen, real = [], generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: seen.append(k["compile"]) or real(*a, **k))
    for extra in ([], ["--compile", "eager"]):
        assert main(["eval-math", str(directory), "--data", str(data), "--max-new-tokens", "4", "--limit", "2",
                     *extra]) == 0
    assert seen == [False, "eager"]


def test_cli_eval_math(tmp_path, capsys):
    directory = tmp_path / "model"
    tiny_model().save_pretrained(directory)
    TOKENIZER.save(directory / "tokenizer")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    records = tmp_path / "out" / "records.jsonl"
    summary = tmp_path / "summary.json"
    assert main(["eval-math", str(directory), "--data", str(data), "--max-new-tokens", "8", "--limit", "3",
                 "--output-jsonl", str(records), "--json", str(summary)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "difficulty 1:" in out and "difficulty 2:" in out
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["question"] == PROBLEMS[0]["question"]
    assert json.loads(summary.read_text())["n"] == 3
    assert main(["eval-math", str(directory), "--data", str(data), "--max-new-tokens", "8", "--plain",
                 "--num-fewshot", "1", "--limit", "2"]) == 0
    assert re.search(r"accuracy [\d.]+ \(\d/2\)", capsys.readouterr().out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": "#### 1"}\nnot json\n')
    assert main(["eval-math", str(directory), "--data", str(bad)]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
