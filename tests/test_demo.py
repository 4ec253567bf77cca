"""`polyglu demo` end to end on tiny configs: what it writes, the thread count it runs with, reuse of
finished stages. The shipped configs/demo*.yaml are only loaded here (training them takes minutes)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from polyglu.cli import main as cli_main
from polyglu.commands.demo import _accuracy_table, _stale, most_frequent_answer_baseline
from polyglu.config import RunConfig, bundled_configs_dir

TINY_MODEL = dict(preset="debug", d_model=32, d_ff=48, n_heads=4, n_kv_heads=2, head_dim=8, max_seq_len=512,
                  gate_hidden=8)
TINY_DATA = dict(builtin="math", tokenizer="train", tokenizer_vocab_size=300, seq_len=128, builtin_train=300,
                 builtin_validation=40, builtin_test=40)
TINY_TRAIN = dict(max_steps=2, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
                  routing_stats_every=2, checkpoint_every=2, keep_checkpoints=1, threads=1, progress=False)


def _write(path: Path, task: str) -> Path:
    config = {"task": task, "model": TINY_MODEL, "data": TINY_DATA, "train": TINY_TRAIN}
    if task == "sft":
        config["train"] = {**TINY_TRAIN, "freeze_tau": True}
    path.write_text(yaml.safe_dump(config))
    return path


def test_shipped_demo_configs_load():
    for name, task in (("demo.yaml", "pretrain"), ("demo-sft.yaml", "sft")):
        config = RunConfig.load(bundled_configs_dir() / name, task=task)
        assert config.task == task and config.data.tokenizer == "train"


def test_a_finished_stage_is_reused_only_for_the_same_steps_and_model():
    model = {"d_model": 32, "n_layers": 2, "activations": ["relu", "gelu"], "vocab_size": 300}
    meta = {"step": 5, "model": dict(model)}
    assert _stale(meta, 5, {**model, "vocab_size": 512}) is None  # the vocabulary follows the tokenizer
    assert _stale(meta, 6, model) == "it ran 5 steps, not 6"
    assert _stale(meta, 5, {**model, "n_layers": 3}) == "its model differs in n_layers (2 -> 3)"
    assert "activations" in _stale(meta, 5, {**model, "activations": ["relu"]})


def test_most_frequent_answer_baseline_and_table():
    train = [{"answer": "x\n#### 3", "difficulty": 1}] * 2 + [{"answer": "#### 4", "difficulty": 2}]
    test = [{"answer": "#### 3", "difficulty": 1}, {"answer": "#### 5", "difficulty": 1},
            {"answer": "#### 4", "difficulty": 2}]
    result = most_frequent_answer_baseline(train, test)
    assert result["per_difficulty"][1] == {"correct": 1, "n": 2, "accuracy": 0.5}
    assert result["per_difficulty"][2]["accuracy"] == 1.0 and result["n"] == 3
    table = _accuracy_table({"baseline": result})
    assert "d=1" in table and "d=2" in table
    assert table.splitlines()[-1].split()[-2:] == ["66.7%", "66.7%"]  # 1-2 step, all


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    pre, sft = _write(tmp_path / "pre.yaml", "pretrain"), _write(tmp_path / "sft.yaml", "sft")
    run_dir = tmp_path / "demo"
    args = ["demo", "--run-dir", str(run_dir), "--config", str(pre), "--sft-config", str(sft), "--eval-limit", "8",
            "--no-report", "--samples", "1"]
    torch.set_num_threads(2)
    try:
        assert cli_main(args) == 0
        assert torch.get_num_threads() == 1  # train.threads of the configs, evaluation included
        results = json.loads((run_dir / "results.json").read_text())
        assert set(results) == {"PolyGLU fine-tuned (chat)", "untrained (chat)", "most frequent answer"}
        assert results["PolyGLU fine-tuned (chat)"]["n"] == 8
        predictions = (run_dir / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 8 and "prediction" in json.loads(predictions[0])
        assert json.loads((run_dir / "sft" / "final" / "config.json").read_text())["step"] == 2
        capsys.readouterr()

        # a second run reuses both finished stages and sets the same threads
        torch.set_num_threads(2)
        assert cli_main(args) == 0
        out = capsys.readouterr().out
        assert "[pretrain] already finished" in out and "[sft] already finished" in out
        assert torch.get_num_threads() == 1

        # another model shape: neither stage is reused (the fine-tuning started from the old model)
        config = yaml.safe_load(pre.read_text())
        config["model"]["n_layers"] = 1
        pre.write_text(yaml.safe_dump(config))
        assert cli_main(args) == 0
        out = capsys.readouterr().out
        assert "[pretrain] " + str(run_dir / "pretrain") + " is not reused: its model differs in n_layers (2 -> 1)" in out
        assert "[sft] 2 steps" in out and "already finished" not in out
        assert json.loads((run_dir / "sft" / "final" / "config.json").read_text())["model"]["n_layers"] == 1
    finally:
        torch.set_num_threads(1)


def test_the_demo_compiles_missing_kernels_while_it_trains(monkeypatch, tmp_path):
    """The evaluation decodes with the native kernels: a missing library is compiled in a background
    thread (a compiler process on the core one-thread training leaves idle), not at the evaluation."""
    import threading

    from polyglu.commands.demo import _build_kernels_in_background
    from polyglu.model import native

    built = []
    monkeypatch.setenv("POLYGLU_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("POLYGLU_NATIVE", raising=False)
    monkeypatch.setattr(native, "build", lambda: built.append(threading.current_thread().name))
    thread = _build_kernels_in_background()
    thread.join()
    assert built == ["polyglu-kernels"]
    native.library_path().parent.mkdir(parents=True)
    native.library_path().touch()  # already built: nothing to do
    assert _build_kernels_in_background() is None
    native.library_path().unlink()
    monkeypatch.setenv("POLYGLU_NATIVE", "0")
    assert _build_kernels_in_background() is None and built == ["polyglu-kernels"]
