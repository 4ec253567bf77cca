"""Stock `lm_eval --model hf` (the real CLI, in a subprocess, loading the export with
trust_remote_code=True and no polyglu) gives the same generations and scores as `polyglu eval`."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
pytest.importorskip("accelerate", reason="accelerate is not installed; `lm_eval --model hf` needs it "
                                         "(pip install -e '.[eval]')")

from lm_eval_tasks import write_tasks  # noqa: E402

from polyglu.cli import main  # noqa: E402
from polyglu.data.tokenizer import ByteTokenizer  # noqa: E402
from polyglu.eval.harness import PolygluLM, evaluate  # noqa: E402

TOKENIZER = ByteTokenizer()
GEN_DOCS = [{"question": "1 + 1", "answer": "2"}, {"question": "a longer question, with more words", "answer": "x"},
            {"question": "3 * 3", "answer": "9"}, {"question": "7 - 2", "answer": "5"}]
MC_DOCS = [{"question": "2 + 2", "choices": ["4", "5", "22"], "label": 0},
           {"question": "opposite of hot", "choices": ["warm", "cold", "ice"], "label": 1}]


def _tasks(root):
    write_tasks(root, "client", MC_DOCS, GEN_DOCS, until=["\n\n", "."], max_gen_toks=12)


def _samples(output_dir, task: str) -> dict[int, dict]:
    files = list(output_dir.rglob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return {row["doc_id"]: row for row in map(json.loads, files[0].read_text().splitlines())}


def test_stock_lm_eval_hf_matches_polyglu_eval(model, tmp_path):
    """`model` (conftest): a byte-vocabulary model with non-trivial routing."""
    _tasks(tmp_path)
    model.save_pretrained(tmp_path / "model")
    TOKENIZER.save(tmp_path / "model" / "tokenizer")
    assert main(["export-hf", str(tmp_path / "model"), str(tmp_path / "export")]) == 0

    ours = evaluate(PolygluLM(model=model, tokenizer=TOKENIZER, batch_size=2, max_gen_toks=12),
                    ["client_gen", "client_mc"], include_path=str(tmp_path), include_defaults=False,
                    log_samples=True, bootstrap_iters=0)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    # the `lm_eval` console script, on a machine without polyglu
    launcher = "import sys; sys.modules['polyglu'] = None; from lm_eval.__main__ import cli_evaluate; cli_evaluate()"
    command = [sys.executable, "-c", launcher, "--model", "hf",
               "--model_args", f"pretrained={tmp_path / 'export'},trust_remote_code=True,dtype=float32",
               "--tasks", "client_gen,client_mc", "--include_path", str(tmp_path), "--device", "cpu",
               "--batch_size", "2", "--log_samples", "--output_path", str(tmp_path / "results")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    theirs = _samples(tmp_path / "results", "client_gen")
    generations = {s["doc_id"]: s["resps"][0][0] for s in ours["samples"]["client_gen"]}
    assert {i: s["resps"][0][0] for i, s in theirs.items()} == generations
    assert len(set(generations.values())) > 1  # continuations that discriminate
    theirs_mc = _samples(tmp_path / "results", "client_mc")
    for sample in ours["samples"]["client_mc"]:
        ours_ll = [r[0][0] for r in sample["resps"]]
        their_ll = [float(r[0][0]) for r in theirs_mc[sample["doc_id"]]["resps"]]
        assert their_ll == pytest.approx(ours_ll, abs=1e-4)
    reported = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]
    assert reported["client_gen"]["exact_match,none"] == ours["results"]["client_gen"]["exact_match,none"]
