"""The lm-evaluation-harness adapter, fully offline: local task YAMLs over JSONL the test writes."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval_tasks import write_tasks  # noqa: E402

from polyglu.cli import main  # noqa: E402
from polyglu.data.tokenizer import load_tokenizer  # noqa: E402
from polyglu.eval.harness import PolygluLM, evaluate  # noqa: E402
from polyglu.inference import generate  # noqa: E402

TOKENIZER = load_tokenizer("byte")
MC_DOCS = [
    {"question": "2 + 2", "choices": ["4", "5", "22"], "label": 0},
    {"question": "capital of France", "choices": ["Paris", "Rome"], "label": 0},
    {"question": "opposite of hot", "choices": ["warm", "cold", "ice"], "label": 1},
]
GEN_DOCS = [{"question": "1 + 1", "answer": "2"}, {"question": "a longer question, with more words", "answer": "x"},
            {"question": "3 * 3", "answer": "9"}]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    write_tasks(root, "polyglu", MC_DOCS, GEN_DOCS, until=["\n", "."], max_gen_toks=10)
    return root


def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0, -len(continuation):]
    return -float(F.cross_entropy(logits, torch.tensor(continuation), reduction="sum"))


def test_tasks_through_lm_eval_match_direct_computation(model, tasks_dir):
    lm = PolygluLM(model=model, tokenizer=TOKENIZER, batch_size=4, max_gen_toks=10)
    results = evaluate(lm, ["polyglu_mc", "polyglu_gen"], include_path=str(tasks_dir), include_defaults=False,
                       log_samples=True, bootstrap_iters=0)
    assert set(results["results"]) == {"polyglu_mc", "polyglu_gen"}
    assert 0.0 <= results["results"]["polyglu_mc"]["acc,none"] <= 1.0

    samples = results["samples"]["polyglu_mc"]
    assert len(samples) == len(MC_DOCS)
    for sample in samples:
        doc = sample["doc"]
        context = TOKENIZER.encode(f"Question: {doc['question']}\nAnswer:")
        for choice, (logprob, _greedy) in zip(doc["choices"], (r[0] for r in sample["resps"])):
            expected = direct_logprob(model, context, TOKENIZER.encode(" " + choice))
            assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5)

    for sample in results["samples"]["polyglu_gen"]:
        prompt = TOKENIZER.encode(f"Q: {sample['doc']['question']}\nA:")[-(48 - 10):]  # room for 10 new tokens
        direct = generate(model, [prompt], 10, eos_token_id=[TOKENIZER.eos_id], tokenizer=TOKENIZER).texts[0]
        expected = min((direct.split(stop)[0] for stop in ["\n", "."]), key=len)
        assert sample["resps"][0][0] == expected


def test_compile_reaches_generate_from_text_model_args(model, monkeypatch):
    """lm_eval passes model_args as text: compile=true / false / a mode or backend name."""
    import polyglu.inference as generation

    assert [PolygluLM(model=model, tokenizer=TOKENIZER, compile=value).compile
            for value in ("true", "False", "", "1", "eager", True)] == [True, False, False, True, "eager", True]
    seen = []
    monkeypatch.setattr(generation, "generate", lambda *a, **k: seen.append(k["compile"]) or generate(*a, **k))
    lm = PolygluLM(model=model, tokenizer=TOKENIZER, batch_size=2, max_gen_toks=4, compile="eager")
    request = Instance("generate_until", {}, ("Q: 2+2?\nA:", {"until": ["\n"], "max_gen_toks": 4}), 0)
    assert len(lm.generate_until([request])) == 1 and seen == ["eager"]


def test_loglikelihood_rolling_uses_windows_past_the_context(model):
    lm = PolygluLM(model=model, tokenizer=TOKENIZER, batch_size=2)
    short, long = "hello world", "".join(chr(97 + (7 * i) % 26) for i in range(110))  # 110 > 48 tokens
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate([short, long])])
    tokens = TOKENIZER.encode(short)
    assert got[0] == pytest.approx(direct_logprob(model, [TOKENIZER.eos_id], tokens), rel=1e-5)
    # disjoint windows of 48 predictions: EOS + the first 47 tokens, then each chunk after its predecessor's last token
    tokens = TOKENIZER.encode(long)
    expected = direct_logprob(model, [TOKENIZER.eos_id], tokens[:48])
    for start in range(48, len(tokens), 48):
        chunk = tokens[start:start + 48]
        context = tokens[max(0, start + len(chunk) - 48 - 1):start]
        expected += direct_logprob(model, context, chunk)
    assert got[1] == pytest.approx(expected, rel=1e-5)


def test_loglikelihood_batches_and_empty_context(model):
    lm = PolygluLM(model=model, tokenizer=TOKENIZER, batch_size=2)
    requests = [("The cat", " sat"), ("", "hello"), ("x" * 60, " y"), ("Q", " a b c")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        ctx = TOKENIZER.encode(context)[-(48 + 1 - len(continuation)):] if context else [TOKENIZER.eos_id]
        assert logprob == pytest.approx(direct_logprob(model, ctx, TOKENIZER.encode(continuation)), rel=1e-5)
        assert isinstance(greedy, bool)
    until = lm.generate_until([Instance("generate_until", {}, ("Hi", {"until": ["zz"], "max_gen_toks": 5}), 0),
                               Instance("generate_until", {}, ("Hi", {"until": "zz", "max_gen_toks": 5,
                                                                      "do_sample": True, "temperature": 0.7}), 1)])
    assert len(until) == 2 and all(isinstance(t, str) for t in until)


def test_cli_eval(model, tasks_dir, tmp_path, capsys):
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    TOKENIZER.save(directory / "tokenizer")
    out = tmp_path / "results.json"
    assert main(["eval", str(directory), "--tasks", "polyglu_mc,polyglu_gen", "--include-path", str(tasks_dir),
                 "--only-include-path", "--limit", "2", "--batch-size", "2", "--bootstrap-iters", "0",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "polyglu_mc" in printed and "polyglu_gen" in printed
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"polyglu_mc", "polyglu_gen"} and "samples" not in results
    assert main(["eval", str(directory), "--tasks", "no_such_task", "--include-path", str(tasks_dir),
                 "--only-include-path"]) == 2
    # lm-eval's own way of building a registered model from an argument string
    from lm_eval.api.registry import get_model

    lm = get_model("polyglu").create_from_arg_string(f"pretrained={directory},batch_size=3",
                                                     {"batch_size": None, "max_batch_size": None, "device": "cpu"})
    assert lm.batch_size == 3 and lm.max_length == 48 and lm.eot_token_id == TOKENIZER.eos_id
