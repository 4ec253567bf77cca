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
    assert report["setup"]["smoke"] is True and report["details"]["generate"]["prompts"] == 13


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
    subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out)], check=True, timeout=600,
                   capture_output=True)
    report = json.loads(out.read_text())
    suite = _load_suite()
    _check_keys(report, list(suite.PARTS))
    assert set(report["decode_batch1_tokens_per_s"]) == {"eager", "compiled"}
