"""The native CPU kernels (polyglu.model.native, csrc/cpu_kernels.cpp): the same math as the eager
paths they replace, used where they apply and only there, and their build: cached, refused with
one line when it cannot happen, and switched by POLYGLU_NATIVE."""

import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from polyglu import PolychromaticLM, generate
from polyglu.inference.cache import KVCache
from polyglu.model import native, small_inference
from polyglu.model.polyglu import PolyGLU, PoolState, mixed_activation, mixed_activation_reference

ALL_NATIVE = native.NATIVE_ACTIVATIONS
DEFAULT = ("relu", "tanh", "silu", "gelu")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that has not tried to load yet, caching under tmp_path."""
    monkeypatch.setattr(native, "_kernels", native._UNTRIED)
    monkeypatch.setenv("POLYGLU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("POLYGLU_NATIVE", raising=False)
    return tmp_path / "cache"


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


# --------------------------------------------------------------------------------------------
# mixed_activation: sum_k g_k act_k(gate) * up


@pytest.mark.parametrize("activations", [DEFAULT, ALL_NATIVE, ("silu",), ("gelu", "relu")])
@pytest.mark.parametrize("B, T, per_token, F", [(1, 1, False, 1536), (3, 5, True, 40), (2, 7, False, 33), (4, 1, False, 1)])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_mixed_activation_equals_the_reference(kernels, activations, B, T, per_token, F, tau):
    K = len(activations)
    gate, up = torch.randn(B, T, F) * 3, torch.randn(B, T, F)
    alpha, dynamic = torch.randn(F, K), torch.randn(B, T if per_token else 1, K)
    expected = mixed_activation_reference(gate, up, alpha, dynamic, None, torch.tensor(tau), activations)
    codes = native.activation_codes(activations)
    for layout in (alpha, column_major(alpha)):
        got = kernels.mixed_activation(gate, up, layout, dynamic, tau, codes)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_extreme_logits_stay_exact(kernels):
    """tau = 0.01 over logits +-10 apart: an exact softmax per unit, no 0/0 (cf. the factorised eager kernel)."""
    activations = ("relu", "silu")
    gate, up = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    alpha = torch.tensor([10.0, -10.0]).expand(16, 2).contiguous()
    dynamic = torch.tensor([-10.0, 10.05]).expand(2, 3, 2).contiguous()
    got = kernels.mixed_activation(gate, up, alpha, dynamic, 0.01, native.activation_codes(activations))
    expected = mixed_activation_reference(gate, up, alpha, dynamic, None, torch.tensor(0.01), activations)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_mixed_activation_in_parallel_equals_one_thread(kernels):
    gate, up = torch.randn(8, 128, 64), torch.randn(8, 128, 64)  # 1024 rows: split across threads
    alpha, dynamic = torch.randn(64, 4), torch.randn(8, 128, 4)
    codes = native.activation_codes(DEFAULT)
    one = kernels.mixed_activation(gate, up, alpha, dynamic, 0.5, codes)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = kernels.mixed_activation(gate, up, alpha, dynamic, 0.5, codes)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # rows are independent: the split changes nothing


def test_bad_inputs_are_refused_by_the_kernel(kernels):
    gate = torch.randn(1, 1, 8)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        kernels.mixed_activation(gate.double(), gate.double(), torch.randn(8, 2), torch.randn(1, 1, 2), 1.0, [0, 1])
    with pytest.raises(RuntimeError, match="alpha must be"):
        kernels.mixed_activation(gate, gate, torch.randn(8, 3), torch.randn(1, 1, 2), 1.0, [0, 1])
    with pytest.raises(RuntimeError, match="unknown activation code"):
        kernels.mixed_activation(gate, gate, torch.randn(8, 2), torch.randn(1, 1, 2), 1.0, [0, 99])


class Spy:
    """Stands in for torch.ops.polyglu_cpu: counts the calls of each kernel, then runs it."""

    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        class Overload:
            def __call__(_, *args):
                self.calls.append(name)
                return op(*args)

            default = property(lambda _: _)
        return Overload()


def test_small_inference_takes_the_kernel_only_where_it_computes_the_same(kernels, monkeypatch):
    spy = Spy(kernels)
    monkeypatch.setattr(native, "_kernels", spy)
    gate, up = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    alpha, dynamic, tau = torch.randn(24, 4), torch.randn(2, 3, 4), torch.tensor(0.7)
    with torch.no_grad():
        for activations, hard, noise, dtype, taken in [
            (DEFAULT, False, None, torch.float32, True),
            (("relu", "softplus"), False, None, torch.float32, False),  # softplus has no native code
            (DEFAULT, True, None, torch.float32, False),  # hard routing
            (DEFAULT, False, torch.randn(2, 24, 4), torch.float32, False),  # noise
            (DEFAULT, False, None, torch.float64, False),
        ]:
            spy.calls.clear()
            K = len(activations)
            inputs = (gate.to(dtype), up.to(dtype), alpha[:, :K].to(dtype), dynamic[..., :K].to(dtype),
                      None if noise is None else noise[..., :K], tau, activations, hard)
            got = mixed_activation(*inputs)
            assert (spy.calls == ["mixed_activation"]) == taken, (activations, hard, noise is not None, dtype)
            torch.testing.assert_close(got, mixed_activation_reference(*inputs), atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# decode_hidden: one decoded token per row, routing network included


def _block(**kwargs) -> PolyGLU:
    block = PolyGLU(32, 48, gate_hidden=8, **kwargs).eval()
    with torch.no_grad():
        block.alpha.normal_(0, 1.0)
        if block.beta is not None:
            block.beta.uniform_(0.5, 2.0)
        block.tau.fill_(0.5)
    return block


def _decode(block: PolyGLU, x: torch.Tensor, positions: torch.Tensor, shared_flags: bool):
    state = PoolState(torch.zeros(x.shape[0], block.gate_net[0].out_features))
    outs = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            pos = positions[:, t:t + 1]
            if shared_flags:  # as KVCache.step_view hands them to every layer
                state.keep, state.count = (pos > 0).float(), (pos + 1).float()
            outs.append(block(x[:, t:t + 1], positions=pos, pool_state=state))
    return torch.cat(outs, 1), state.total


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("shared_flags", [True, False])
def test_decode_hidden_equals_the_eager_decode_and_the_full_forward(kernels, monkeypatch, layout, shared_flags):
    block = _block()
    if layout == "columns":  # polyglu's decode layout (PolychromaticLM.use_decode_layout)
        with torch.no_grad():
            for p in (block.gate_net[0].weight, block.gate_net[2].weight, block.alpha, block.gate_proj.weight):
                p.data = column_major(p.data)
    x = torch.randn(3, 9, 32)
    positions = torch.tensor([list(range(9)), [0, 1, 2, 0, 1, 2, 3, 0, 1], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
    spy = Spy(kernels)
    monkeypatch.setattr(native, "_kernels", spy)
    got, total = _decode(block, x, positions, shared_flags)
    assert spy.calls == ["decode_hidden"] * 9
    monkeypatch.setattr(native, "_kernels", None)
    expected, expected_total = _decode(block, x, positions, shared_flags)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total, expected_total, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the first two rows start at position 0: the full forward over their documents
        doc_ids = torch.cumsum((positions[:2] == 0).long(), 1)
        torch.testing.assert_close(got[:2], block(x[:2], doc_ids), atol=1e-6, rtol=1e-5)


def test_decode_takes_the_eager_path_where_the_kernel_does_not_apply(kernels, monkeypatch):
    spy = Spy(kernels)
    monkeypatch.setattr(native, "_kernels", spy)
    x, positions = torch.randn(2, 1, 32), torch.tensor([[3], [0]])

    def decoded(block, grad=False, **kwargs):
        spy.calls.clear()
        state = PoolState(torch.zeros(2, 8))
        with torch.set_grad_enabled(grad):
            out = block(x, positions=positions, pool_state=state, **kwargs)
        return out, spy.calls == ["decode_hidden"]

    assert decoded(_block())[1]
    out, taken = decoded(_block(), grad=True)  # gradients wanted: autograd needs the eager ops
    assert not taken and out.requires_grad
    assert not decoded(_block(eval_routing="hard"))[1]
    assert not decoded(_block(activations=("relu", "softplus")))[1]
    assert not decoded(_block(routing_mode="static"))[1]
    assert not decoded(_block().train())[1]  # Gumbel noise in training
    assert not decoded(_block(), return_routing=True)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not decoded(_block())[1]
    assert decoded(_block(routing_noise=False).train())[1]  # training without noise: the same soft routing


def test_decode_reads_the_layer_once_per_cache_and_the_moment_at_every_token(kernels, monkeypatch):
    """What the kernel needs of the layer is looked up once per KV cache (keyed by its running sums
    and the layer's mode); values changed in place, grad mode, autocast and the mode still count at
    every token, and another cache reads the layer again."""
    block = _block()
    spy = Spy(kernels)
    monkeypatch.setattr(native, "_kernels", spy)
    x, positions = torch.randn(2, 4, 32), torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]])

    def step(state, t, grad=False):
        spy.calls.clear()
        with torch.set_grad_enabled(grad):
            out = block(x[:, t:t + 1], positions=positions[:, t:t + 1], pool_state=state)
        return out, spy.calls == ["decode_hidden"]

    def eager(state, t):
        monkeypatch.setattr(native, "_kernels", None)
        try:
            with torch.no_grad():
                return block(x[:, t:t + 1], positions=positions[:, t:t + 1], pool_state=state)
        finally:
            monkeypatch.setattr(native, "_kernels", spy)

    state, twin = PoolState(torch.zeros(2, 8)), PoolState(torch.zeros(2, 8))
    out, taken = step(state, 0)
    assert taken and torch.allclose(out, eager(twin, 0), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        block.alpha.mul_(-2.0)  # in place: the next token reads the new values
    out, taken = step(state, 1)
    assert taken and torch.allclose(out, eager(twin, 1), atol=1e-6, rtol=1e-5)
    out, taken = step(state, 2, grad=True)  # gradients wanted mid-cache: autograd's eager ops
    assert not taken and out.requires_grad
    eager(twin, 2)
    block.train()  # training mode with Gumbel noise: the kernel does not apply
    assert not step(state, 3)[1]
    block.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not step(PoolState(torch.zeros(2, 8)), 0)[1]
    block.alpha = torch.nn.Parameter(torch.randn(48, 4))  # replaced: a new cache reads the new tensor
    state, twin = PoolState(torch.zeros(2, 8)), PoolState(torch.zeros(2, 8))
    out, taken = step(state, 0)
    assert taken and torch.allclose(out, eager(twin, 0), atol=1e-6, rtol=1e-5)


def test_an_adapter_on_the_routing_network_decodes_through_its_own_forward(kernels, monkeypatch):
    """A module standing in for one of gate_net's layers (an adapter such as PEFT's LoRA) has a forward
    of its own that the kernel's weights-only routing step would skip: such a layer decodes eagerly,
    and its cached decoding equals its full forward."""

    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.5

    block = _block()
    shifted = Shifted(32, 8)
    shifted.load_state_dict(block.gate_net[0].state_dict())
    block.gate_net[0] = shifted
    spy = Spy(kernels)
    monkeypatch.setattr(native, "_kernels", spy)
    x = torch.randn(2, 5, 32)
    positions = torch.arange(5).expand(2, 5)
    got, _ = _decode(block, x, positions, shared_flags=True)
    assert "decode_hidden" not in spy.calls
    with torch.no_grad():
        torch.testing.assert_close(got, block(x), atol=1e-6, rtol=1e-5)
    hooked, seen = _block(), []  # a hook on the routing network runs: eager decoding calls it
    hooked.gate_net[2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    spy.calls.clear()
    _decode(hooked, x, positions, shared_flags=True)
    assert "decode_hidden" not in spy.calls and len(seen) == 5


def test_routing_saturated_on_silu_decodes_exactly_swiglu(kernels, monkeypatch):
    """A PolyGLU model routed to SiLU (a Qwen3 upcycled by `polyglu convert --from qwen3`) decodes,
    through the native kernel, exactly what the same weights give as SwiGLU, bit for bit."""
    from polyglu.config import ModelConfig
    from polyglu.interop.qwen3 import route_to_silu

    config = ModelConfig.from_preset("debug", vocab_size=97, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2,
                                     head_dim=8, max_seq_len=64, gate_hidden=8)
    torch.manual_seed(0)
    polyglu = PolychromaticLM(config).eval()
    route_to_silu(polyglu)
    swiglu = PolychromaticLM(config.replace(ffn="swiglu")).eval()
    missing, _ = swiglu.load_state_dict(polyglu.state_dict(), strict=False)
    assert not missing
    polyglu.use_decode_layout()
    swiglu.use_decode_layout()
    spy = Spy(kernels)
    monkeypatch.setattr(native, "_kernels", spy)
    prompt = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        caches = {name: KVCache.for_model(m, 1, 20) for name, m in (("polyglu", polyglu), ("swiglu", swiglu))}
        logits = {name: m(prompt, cache=caches[name]).logits for name, m in (("polyglu", polyglu), ("swiglu", swiglu))}
        assert torch.equal(logits["polyglu"], logits["swiglu"])
        token = logits["polyglu"][:, -1:].argmax(-1)
        for _ in range(6):
            spy.calls.clear()
            step = {name: m(token, cache=caches[name]).logits for name, m in (("polyglu", polyglu), ("swiglu", swiglu))}
            assert spy.calls == ["decode_hidden"] * config.n_layers
            assert torch.equal(step["polyglu"], step["swiglu"])
            token = step["polyglu"][:, -1:].argmax(-1)


def test_generation_with_the_kernels_equals_generation_without(kernels, monkeypatch, tiny_config):
    model = PolychromaticLM(tiny_config).eval()
    with torch.no_grad():
        for layer in model.polyglu_layers():
            layer.alpha.normal_(0, 2.0)
    model.use_decode_layout()
    prompts = torch.randint(1, tiny_config.vocab_size, (2, 6))
    spy = Spy(kernels)
    monkeypatch.setattr(native, "_kernels", spy)
    native_out = generate(model, prompts, 12, eos_token_id=[])
    assert "decode_hidden" in spy.calls and "mixed_activation" in spy.calls  # decode steps and prefill
    monkeypatch.setattr(native, "_kernels", None)
    eager_out = generate(model, prompts, 12, eos_token_id=[])
    assert torch.equal(native_out.tokens, eager_out.tokens)
    sequence = torch.cat([prompts, native_out.tokens], 1)
    with torch.no_grad():  # cached (native) logits == an uncached (eager) forward over the whole sequence
        monkeypatch.setattr(native, "_kernels", kernels)
        cache = KVCache.for_model(model, 2, 20)
        prefix = model(sequence[:, :6], cache=cache).logits
        steps = [model(sequence[:, t:t + 1], cache=cache).logits for t in range(6, 14)]
        cached = torch.cat([prefix, *steps], 1)
        monkeypatch.setattr(native, "_kernels", None)
        torch.testing.assert_close(cached, model(sequence[:, :14]).logits, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# building and switching


def test_the_library_is_cached_by_source_torch_and_cpu(fresh_native, monkeypatch):
    path = native.library_path()
    assert path.parent == fresh_native / "kernels" and path.name.startswith("polyglu_cpu-")
    assert native.library_path() == path  # stable
    edited = fresh_native.parent / "cpu_kernels.cpp"
    edited.write_bytes(native.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.library_path() != path  # another source: another library, never a stale one


def test_the_bf16_conversion_instruction_is_used_only_where_the_cpu_has_it(monkeypatch):
    # -mavx512bf16 lets the compiler emit instructions only such CPUs run: never on another CPU
    if not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("this torch lists no CPU features (torch < 2.6): the flag is never added")
    base = native._CAPABILITY_FLAGS["AVX512"]
    for has_bf16 in (True, False):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda has=has_bf16: {"avx512_bf16": has})
        assert native.capability_flags("AVX512") == base + ["-mavx512bf16"] * has_bf16
        assert native.capability_flags("AVX2") == native._CAPABILITY_FLAGS["AVX2"]  # AVX2 code: never
        assert native.capability_flags("DEFAULT") == []


@pytest.mark.parametrize("value, expected", [("", "auto"), ("auto", "auto"), ("1", "on"), ("ON", "on"),
                                             ("0", "off"), ("false", "off")])
def test_polyglu_native_values(monkeypatch, value, expected):
    monkeypatch.setenv("POLYGLU_NATIVE", value)
    assert native.mode() == expected


def test_an_unknown_polyglu_native_value_is_one_line(monkeypatch, fresh_native):
    monkeypatch.setenv("POLYGLU_NATIVE", "maybe")
    with pytest.raises(ValueError, match="POLYGLU_NATIVE must be auto, 1/on or 0/off, got 'maybe'"):
        native.kernels()


def test_threads_decoding_at_once_load_the_kernels_once(monkeypatch, fresh_native):
    import threading

    calls, barrier = [], threading.Barrier(4)

    def slow_load():  # a build takes seconds: every thread would start one without the lock
        calls.append(1)
        time.sleep(0.05)
        return "kernels"

    monkeypatch.setattr(native, "_load", slow_load)

    def first_use():
        barrier.wait()
        assert native.kernels() == "kernels"

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_off_builds_nothing(monkeypatch, fresh_native):
    monkeypatch.setenv("POLYGLU_NATIVE", "0")
    assert native.kernels() is None and not fresh_native.exists()


def test_without_a_compiler_auto_warns_once_and_decodes_eagerly(monkeypatch, fresh_native):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match=r"CPU kernels unavailable \(no C\+\+ compiler: '/nonexistent/c\+\+'"):
        assert native.kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.kernels() is None  # decided once: no second warning
        block = _block()
        with torch.no_grad():
            block(torch.randn(1, 1, 32), positions=torch.tensor([[0]]), pool_state=PoolState(torch.zeros(1, 8)))


def test_any_load_failure_in_auto_falls_back(monkeypatch, fresh_native):
    """Whatever fails (here: a platform without fcntl), "auto" warns and computes eagerly."""
    def no_fcntl(*args, **kwargs):
        raise ImportError("No module named 'fcntl'")

    monkeypatch.setattr(native, "build", no_fcntl)
    with pytest.warns(RuntimeWarning, match="No module named 'fcntl'"):
        assert native.kernels() is None


def test_on_without_a_compiler_is_an_error(monkeypatch, fresh_native):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("POLYGLU_NATIVE", "on")
    with pytest.raises(native.NativeBuildError, match="POLYGLU_NATIVE=on but the CPU kernels are unavailable: no C"):
        native.kernels()


def test_a_verb_that_requires_missing_kernels_exits_with_one_line(monkeypatch, fresh_native, model, tmp_path, capsys):
    from polyglu.cli import main
    from polyglu.data.tokenizer import load_tokenizer

    model.save_pretrained(tmp_path / "model")
    load_tokenizer("byte").save(tmp_path / "model" / "tokenizer")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("POLYGLU_NATIVE", "on")
    assert main(["generate", str(tmp_path / "model"), "--prompt", "1 + 1 =", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "polyglu generate: error: POLYGLU_NATIVE=on but the CPU kernels are unavailable: no C++ compiler: "
        "'/nonexistent/c++' is not on PATH (set CXX)"]


def test_a_failed_build_names_the_cause_keeps_a_log_and_leaves_no_library(monkeypatch, fresh_native):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(native.NativeBuildError, match=r"compiling cpu_kernels.cpp failed: exit status 1 \(full log: "):
        native.build()
    assert not native.library_path().exists() and native.library_path().with_suffix(".log").exists()
    assert [p.name for p in native.library_path().parent.iterdir() if p.name.endswith(".tmp")] == []


def test_build_kernels_command(fresh_native, monkeypatch, capsys):
    from polyglu.cli import main

    assert main(["build-kernels", "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(native.library_path())
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert main(["build-kernels"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "polyglu build-kernels: error: no C++ compiler: '/nonexistent/c++' is not on PATH (set CXX)"]
    assert not native.library_path().exists()


def test_an_unloadable_library_names_itself_and_the_fix(monkeypatch, fresh_native):
    path = native.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    monkeypatch.setattr(native, "_loaded", lambda: False)  # as in a process that has not loaded it yet
    with pytest.raises(native.NativeBuildError, match=rf"cannot load {path} .*polyglu build-kernels --force"):
        native.load(path)


def test_force_rebuilds_over_a_cached_library(monkeypatch, fresh_native):
    path = native.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stale")
    assert native.build() == path and path.read_bytes() == b"stale"  # cached: nothing compiled
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(native.NativeBuildError, match="compiling cpu_kernels.cpp failed"):
        native.build(force=True)  # compiled again (and this compiler fails)
    assert path.read_bytes() == b"stale"  # a failed build leaves the old file as it was


@pytest.mark.slow
def test_build_kernels_command_builds_into_an_empty_cache(fresh_native):
    done = subprocess.run([sys.executable, "-m", "polyglu", "build-kernels"], capture_output=True, text=True,
                          env={**os.environ, "POLYGLU_CACHE_DIR": str(fresh_native)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(native.library_path()) and native.library_path().exists()
    assert "compiling the CPU kernels" in done.stderr


# --------------------------------------------------------------------------------------------
# one function chooses; its choice shows in repr and in the logs


def test_one_function_chooses_the_small_path_and_says_so(kernels, monkeypatch, caplog):
    monkeypatch.setattr(small_inference, "_logged", set())
    x = torch.randn(1, 1, 32)
    gate, up, alpha, dynamic = torch.randn(1, 1, 48), torch.randn(1, 1, 48), torch.randn(48, 4), torch.randn(1, 1, 4)
    tensors = (gate, up, alpha, dynamic, None)
    with torch.no_grad(), caplog.at_level("INFO", logger="polyglu.model.small_inference"):
        assert small_inference.choose(tensors, DEFAULT, hard=False, noisy=False) == "native"
        assert small_inference.choose(tensors, DEFAULT, hard=True, noisy=False) == "eager"
        assert small_inference.choose(tensors, ("relu", "softplus"), hard=False, noisy=False) == "eager"
        assert small_inference.choose((x,), DEFAULT, hard=False, noisy=False, decode=True) == "native-decode"
        assert small_inference.choose((x.double(),), DEFAULT, hard=False, noisy=False, decode=True) is None
        small_inference.choose(tensors, DEFAULT, hard=False, noisy=False)  # logged once per path
    assert [r.getMessage().split(" path")[0] for r in caplog.records] == [
        f"polyglu: small inference calls take the {path}" for path in ("native", "eager", "native-decode")]
    with torch.enable_grad():  # gradients needed: the fused kernels, not an override
        assert small_inference.choose((gate.requires_grad_(), up), DEFAULT, hard=False, noisy=False) is None
    assert "small_inference='native'" in repr(PolyGLU(32, 48, gate_hidden=8))
    assert "small_inference='eager (softplus: no native code)'" in repr(
        PolyGLU(32, 48, activations=("relu", "softplus"), gate_hidden=8))
    monkeypatch.setattr(native, "_kernels", None)
    assert "small_inference='eager (native kernels unavailable)'" in repr(PolyGLU(32, 48, gate_hidden=8))
    monkeypatch.setenv("POLYGLU_NATIVE", "0")
    assert small_inference.describe(DEFAULT) == "eager (POLYGLU_NATIVE=off)"
    monkeypatch.setattr(native, "_kernels", native._UNTRIED)
    assert small_inference.describe(DEFAULT) == "eager (POLYGLU_NATIVE=off)"
    monkeypatch.setenv("POLYGLU_NATIVE", "auto")
    assert small_inference.describe(DEFAULT) == "native (built on first use)"
    assert native._kernels is native._UNTRIED  # describing builds nothing
