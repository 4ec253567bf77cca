"""The CPU kernels on every instruction set: the native kernels' and the fused kernel's tests run
again with torch lowered to AVX2 (ATEN_CPU_CAPABILITY=avx2, what an AVX2-only CPU runs; on an
AVX2 machine the ordinary run is that run), and a CPU with neither AVX2 nor AVX-512 (emulated with
ATEN_CPU_CAPABILITY=default), or without a compiler, still computes the same, saying which path it took."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# a decode step of a PolyGLU layer through the native kernels when they load (eager ops otherwise),
# against the eager reference; prints the capability, whether the kernels loaded, and the largest error
CHECK = """
import torch
from polyglu import PolychromaticLM, generate
from polyglu.config import ModelConfig
from polyglu.model import native
from polyglu.model.polyglu import mixed_activation_reference

torch.manual_seed(0)
gate, up = torch.randn(3, 5, 40) * 3, torch.randn(3, 5, 40)
alpha, dynamic = torch.randn(40, 4), torch.randn(3, 1, 4)
acts = ("relu", "tanh", "silu", "gelu")
expected = mixed_activation_reference(gate, up, alpha, dynamic, None, torch.tensor(0.7), acts)
ops = native.kernels()
error = 0.0
if ops is not None:
    got = ops.mixed_activation(gate, up, alpha, dynamic, 0.7, native.activation_codes(acts))
    error = float((got - expected).abs().max())
config = ModelConfig.from_preset("debug", vocab_size=97, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2, head_dim=8,
                                 max_seq_len=64, gate_hidden=8)
model = PolychromaticLM(config).eval()
ids = torch.randint(0, 97, (1, 5))
cached = generate(model, ids, max_new_tokens=6).tokens
recomputed = ids
for _ in range(6):  # greedy without a cache: the eager reference path
    recomputed = torch.cat([recomputed, model(recomputed).logits[:, -1:].argmax(-1)], dim=1)
print(torch.backends.cpu.get_cpu_capability(), ops is not None, error, bool((cached[:, -6:] == recomputed[:, -6:]).all()))
"""


def _run(code_or_args, env_changes: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env_changes}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _capability_under(value: str) -> str:
    out = _run("import torch; print(torch.backends.cpu.get_cpu_capability())", {"ATEN_CPU_CAPABILITY": value})
    return out.stdout.strip()


def test_kernel_tests_pass_with_torch_lowered_to_avx2():
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        pytest.skip("torch runs AVX2 here already: the ordinary run of these tests is the AVX2 run")
    if _capability_under("avx2") != "AVX2":
        pytest.skip("this CPU cannot run torch's AVX2 kernels")
    # POLYGLU_NATIVE=on: the native kernels must build for AVX2 (their tests would skip otherwise)
    out = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_native.py", "tests/test_native_training.py",
                "tests/test_fused.py"],
               {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "POLYGLU_NATIVE": "on"}, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.slow  # compiles the kernels afresh (~10 s idle, minutes on a loaded machine)
def test_without_avx2_or_avx512_the_kernels_are_scalar_code_and_say_so(tmp_path):
    if _capability_under("default") != "DEFAULT":
        pytest.skip("ATEN_CPU_CAPABILITY=default is not honoured here")
    out = _run(CHECK, {"ATEN_CPU_CAPABILITY": "default", "POLYGLU_NATIVE": "on",
                       "POLYGLU_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    capability, loaded, error, same = out.stdout.split()
    assert (capability, loaded, same) == ("DEFAULT", "True", "True") and float(error) < 1e-5
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "compiling the CPU kernels" in lines[0]
    assert "scalar code (torch runs its DEFAULT kernels: no AVX2/AVX-512)" in lines[0]


def test_without_a_compiler_decoding_runs_on_eager_ops_and_says_so(tmp_path):
    out = _run(CHECK, {"CXX": "/nonexistent/c++", "POLYGLU_NATIVE": "auto", "POLYGLU_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    _, loaded, _, same = out.stdout.split()
    assert (loaded, same) == ("False", "True")
    warning = [line for line in out.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warning) == 1 and "no C++ compiler" in warning[0] and "eager ops" in warning[0]
