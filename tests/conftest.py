import os

# Triton kernels run on CPU tensors through Triton's interpreter (tests/test_triton_mixed.py, the fused
# loss). Triton reads this when it is imported, so it is set before anything imports it; on a GPU
# machine, TRITON_INTERPRET=0 runs them compiled instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from polyglu.config import ModelConfig
from polyglu.model.transformer import PolychromaticLM

# tiny models are dominated by per-op overhead: one thread is faster and keeps runs deterministic
torch.set_num_threads(1)
# ... also in every trainer and subprocess (train.threads: null reads it; else it would follow the load)
os.environ.setdefault("POLYGLU_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A 2-layer model small enough for exhaustive checks in milliseconds."""
    return ModelConfig.from_preset("debug", vocab_size=97, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2,
                                   head_dim=8, max_seq_len=64, gate_hidden=8)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def model() -> PolychromaticLM:
    """A byte-vocabulary (260) model with non-trivial static routing, for scoring tests."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("debug", vocab_size=260, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2,
                                     head_dim=8, max_seq_len=48, gate_hidden=8, init_std=0.1)
    m = PolychromaticLM(config)
    with torch.no_grad():
        for layer in m.polyglu_layers():
            layer.alpha.normal_(0.0, 2.0)
    return m.eval()


@pytest.fixture
def kernels():
    """The native CPU kernels (built on first use), or a skip where they are unavailable (no C++
    compiler, POLYGLU_NATIVE=0). With a compiler on PATH a build that fails is a failure, not a
    skip: a C++ error must not turn the kernels' tests into skips."""
    import shlex
    import shutil

    from polyglu.model import native

    ops = native.kernels()
    if ops is None:
        if native.mode() != "off" and shutil.which(shlex.split(native.compiler())[0]):
            try:
                native.load(native.build())
            except Exception as e:  # noqa: BLE001 (any build or load error is the finding)
                pytest.fail(f"a C++ compiler is here but the native CPU kernels did not build or load: {e}")
        pytest.skip("the native CPU kernels are unavailable here (no C++ compiler?)")
    return ops
