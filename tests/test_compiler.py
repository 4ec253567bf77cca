"""polyglu.model.compiler: every compile keys inductor's caches by the CPU vector instruction set."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "polyglu"

CHILD = textwrap.dedent("""
    import torch
    from torch._dynamo.utils import counters
    from polyglu.model.compiler import compile_fn, pin_cpu_isa

    def f(x, y):
        return torch.nn.functional.silu(x) * y + x.sum(0)

    x, y = torch.randn(64, 100), torch.randn(64, 100)
    out = compile_fn(f)(x, y)
    assert torch.allclose(out, f(x, y), atol=1e-5), "wrong result"
    print(pin_cpu_isa(), "hits", counters["inductor"]["fxgraph_cache_hit"])
""")


def _child(capability: str, cache_dir: Path) -> str:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{proc.stderr[-2000:]}"
    return proc.stdout.strip().splitlines()[-1]


def test_a_graph_compiled_for_one_instruction_set_is_not_reused_by_another(tmp_path):
    """Without the pin, the second process (scalar code) is handed the first one's cached vectorised
    source and fails to compile it; between AVX-512 and AVX2 the same reuse corrupts memory."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best not in ("avx2", "avx512"):
        pytest.skip(f"CPU capability {best}: no second instruction set to compare with")
    first = _child(best, tmp_path)
    # "avx2 (simdlen 256)", "avx512 avx512_vnni (simdlen 512)", or a cache tag where AMX ranks first
    assert re.match(rf"{best}\b[^(]*\((simdlen (256|512)|cache tag)\) hits 0$", first), first
    assert _child("default", tmp_path) == "scalar (simdlen 0) hits 0"  # a cache miss: its own graph
    assert _child(best, tmp_path).endswith("hits 1")  # and each keeps hitting its own entry


def test_every_compile_goes_through_the_door():
    """No torch.compile / Module.compile in src/polyglu outside polyglu.model.compiler."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "compiler.py" and path.parent.name == "model":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.compile\(|\.compile\(\)", code):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "compile through polyglu.model.compiler.compile_fn:\n" + "\n".join(offenders)
