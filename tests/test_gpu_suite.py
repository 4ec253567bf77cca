"""benchmarks/gpu_suite.py: --smoke writes every figure's key, numeric; a failing part is recorded
and the others still run. (The figures themselves are measured on a GPU, never asserted here.)"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def _load_suite():
    if "gpu_suite" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_suite"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_suite"]


def _numeric(value) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(_numeric(v) for v in value.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(report: dict, parts) -> None:
    suite = _load_suite()
    assert report["errors"] == {}, report["errors"]
    for part in parts:
        for key in suite.KEYS[part]:
            assert _numeric(report[key]), (key, report[key])
    assert set(report["seconds"]) == set(parts)


def test_smoke_subset_writes_numeric_keys(tmp_path):
    out = tmp_path / "smoke.json"
    suite = _load_suite()
    assert suite.main(["--smoke", "--parts", "kernel,generate", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    _check_keys(report, ["kernel", "generate"])
    assert report["kernel_max_error"] < 1e-4  # the kernel's math agrees with the reference
    # under TRITON_INTERPRET=1 (tests/conftest.py) that is the Triton kernel CUDA trains with
    assert report["details"]["kernel"]["kernel"] == ("triton" if suite._interpreting() else "dense")
    assert report["setup"]["smoke"] is True and report["details"]["generate"]["prompts"] == 13


def test_smoke_training_parts_compare_and_count(tmp_path):
    """attention, compiled_block and train at tiny shapes: every key numeric, the compiled blocks equal
    to the eager ones (float32: loss and every gradient), nothing fell back, no graph break, no recompile after
    warm-up, and the compile caches in the directory a next run can be given."""
    out = tmp_path / "smoke.json"
    suite = _load_suite()
    assert suite.main(["--smoke", "--parts", "attention,compiled_block,train", "--out", str(out),
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads(out.read_text())
    _check_keys(report, ["attention", "compiled_block", "train"])
    assert set(report["attention_fwd_bwd_ms"]) == {"flex", "sdpa_masked", "sdpa_is_causal"}
    # flex and the masked SDPA compute the same attention
    assert max(report["details"]["attention"]["max_error_vs_float32"].values()) < 1e-4
    assert report["compiled_block_max_rel_error"] < 1e-4  # float32 in the smoke run: loss and every gradient
    assert report["details"]["compiled_block"]["dynamo"]["graph_breaks"] == 0
    fallbacks = report["fallbacks"]
    assert not fallbacks["flex_replaced_by_sdpa"] and not fallbacks["batch_halved_after_oom"]
    assert fallbacks["recompiles_after_warmup"] == 0 and fallbacks["loss_kernel"] == "chunked"  # CPU
    assert set(report["train_peak_memory_gib"]) == set(report["train_compile_s"]) == {"polyglu", "swiglu"}
    assert report["details"]["train"]["batch_size"] == report["details"]["train"]["estimated_batch"]
    assert report["setup"]["inductor_cache_dir"].startswith(str(tmp_path / "cache"))


def test_batch_comes_from_the_memory_estimate():
    from polyglu.config import ModelConfig

    suite = _load_suite()
    config = ModelConfig.from_preset("paper-600m")
    batch, estimate = suite.estimate_batch(config, 4096, (24, 16, 12, 8, 4, 2, 1), 72 * 2**30)
    assert 597_000_000 < estimate["parameters"] < 598_000_000
    assert estimate["estimated_gib"] <= 72  # fits the free memory it was given ...
    bigger = suite.estimate_batch(config, 4096, (24, 16, 12, 8, 4, 2, 1), 140 * 2**30)[0]
    assert bigger > batch >= 2  # ... and more memory, a larger batch
    # with twice the tokens per sequence the batch at most halves
    assert suite.estimate_batch(config, 8192, (24, 16, 12, 8, 4, 2, 1), 72 * 2**30)[0] <= max(1, batch // 2)


def test_evaluation_parts_are_opt_in(tmp_path):
    suite = _load_suite()
    out = str(tmp_path / "x.json")
    assert suite.parse_args(["--out", out]).parts == list(suite.DEFAULT_PARTS)
    assert not set(suite.DEFAULT_PARTS) & set(suite.EVAL_PARTS)
    assert suite.parse_args(["--out", out, "--with-eval"]).parts == list(suite.DEFAULT_PARTS + suite.EVAL_PARTS)
    assert suite.parse_args(["--out", out, "--parts", "decode"]).parts == ["decode"]
    assert suite.parse_args(["--out", out]).max_total_s == 420
    assert sum(suite.full_shapes("cuda").budgets_s[p] for p in suite.DEFAULT_PARTS) <= 420


def test_a_failing_part_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    suite = _load_suite()

    def broken(shapes, budget_s):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(suite.PART_FUNCTIONS, "generate", broken)
    out = tmp_path / "r.json"
    suite.main(["--smoke", "--parts", "generate,kernel", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["errors"] == {"generate": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert report["generate_1319x256_s"] is None and _numeric(report["kernel_max_error"])


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    suite = _load_suite()
    with pytest.raises(SystemExit):
        suite.main(["--parts", "ffn,warp", "--out", str(tmp_path / "x.json")])
    assert "--parts: unknown part 'warp'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main(["--out", str(tmp_path / "missing" / "x.json")])
    assert "does not exist" in capsys.readouterr().err


def test_attended_pairs_count_inside_documents():
    import torch

    suite = _load_suite()
    # documents of 3 and 2 tokens (the id 0 returns: a new document), one of 5
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [4, 4, 4, 4, 4]])
    assert suite.attended_pairs(doc_ids) == (6 + 3) + 15


@pytest.mark.slow
def test_full_smoke_run_has_every_key(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, str(SUITE), "--smoke", "--with-eval", "--out", str(out)], check=True, timeout=600,
                   capture_output=True)
    report = json.loads(out.read_text())
    suite = _load_suite()
    _check_keys(report, list(suite.PARTS))
    assert set(report["decode_batch1_tokens_per_s"]) == {"eager", "compiled"}
