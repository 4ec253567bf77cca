"""polyglu.hardware: dtype `auto` by native bf16 (torch's probes), threads from affinity and load,
the one warning for emulated bf16, and what training runs record."""

import json
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from polyglu import hardware


@pytest.fixture
def fresh(monkeypatch):
    """No cached probe, automatic thread choice or warning from an earlier test."""
    hardware.cpu_bf16_native.cache_clear()
    hardware._auto_threads.cache_clear()
    monkeypatch.setattr(hardware, "_warned_emulated_bf16", False)
    yield
    hardware.cpu_bf16_native.cache_clear()
    hardware._auto_threads.cache_clear()


def _native(monkeypatch, native: bool):
    monkeypatch.setattr(hardware, "bf16_native", lambda device: (native, "probe says so"))


def test_auto_is_bf16_only_where_native(monkeypatch, fresh):
    _native(monkeypatch, True)
    assert hardware.choose_precision("auto", "cpu").name == "bfloat16"
    assert hardware.choose_precision(None, "cpu").dtype == torch.bfloat16
    _native(monkeypatch, False)
    chosen = hardware.choose_precision("auto", "cpu")
    assert chosen.name == "float32" and "no native bf16: probe says so" in chosen.describe()


def test_auto_inference_on_cpu_is_float32_even_with_native_bf16(monkeypatch, fresh):
    _native(monkeypatch, True)
    assert hardware.choose_precision("auto", "cpu", purpose="inference").name == "float32"
    assert hardware.choose_precision("auto", "cuda", purpose="inference").name == "bfloat16"


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(monkeypatch, fresh):
    _native(monkeypatch, False)
    with pytest.warns(RuntimeWarning, match="emulated .*several times slower"):
        assert hardware.choose_precision("bfloat16", "cpu").name == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second time: no warning
        assert hardware.choose_precision("bfloat16", "cpu").name == "bfloat16"
        assert hardware.choose_precision("float32", "cpu").reason == "asked"


def test_explicit_bf16_where_native_does_not_warn(monkeypatch, fresh):
    _native(monkeypatch, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.choose_precision("bfloat16", "cpu").name == "bfloat16"


def test_unknown_dtypes_are_refused_naming_the_value(fresh):
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        hardware.choose_precision("float64", "cpu")
    with pytest.raises(ValueError, match="'float16'"):
        hardware.choose_precision("float16", "cpu")  # training autocast: bf16 or nothing
    assert hardware.choose_precision("float16", "cpu", purpose="inference").dtype == torch.float16


def test_the_cpu_probe_follows_the_capability_torch_runs_with(monkeypatch, fresh):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX2")
    native, why = hardware.cpu_bf16_native()
    assert not native and "AVX2" in why and "ATEN_CPU_CAPABILITY" in why

    hardware.cpu_bf16_native.cache_clear()
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    native, why = hardware.cpu_bf16_native()
    assert not native and "ONEDNN_MAX_CPU_ISA" in why

    hardware.cpu_bf16_native.cache_clear()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False},
                        raising=False)
    native, why = hardware.cpu_bf16_native()
    assert not native and "BF16 instructions" in why

    hardware.cpu_bf16_native.cache_clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True}, raising=False)
    assert hardware.cpu_bf16_native()[0]

    hardware.cpu_bf16_native.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert not hardware.cpu_bf16_native()[0]


def test_aten_cpu_capability_avx2_turns_auto_to_float32():
    """In a fresh process whose torch runs its AVX2 kernels (what an AVX2-only CPU gets; on an AVX-512
    machine this is the emulation), auto training precision is float32."""
    code = ("from polyglu import hardware; import torch; p = hardware.choose_precision('auto', 'cpu'); "
            "print(torch.backends.cpu.get_cpu_capability(), p.name)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "float32"]


def test_free_threads_leaves_busy_cpus_out():
    assert hardware.free_threads(2, 0.1, 2) == 2  # idle
    assert hardware.free_threads(2, 0.5, 2) == 2
    assert hardware.free_threads(2, 0.7, 2) == 1  # one core mostly busy
    assert hardware.free_threads(2, 6.0, 2) == 1  # never below one
    assert hardware.free_threads(8, 16.0, 64) == 6  # the load spreads over the whole machine
    assert hardware.free_threads(4, None, 4) == 4  # no load average: every usable CPU


def test_threads_precedence_and_bad_values(monkeypatch, fresh):
    monkeypatch.setenv("POLYGLU_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert hardware.choose_threads(5) == hardware.Threads(5, "train.threads")
    assert hardware.choose_threads() == hardware.Threads(3, "POLYGLU_THREADS=3")
    monkeypatch.delenv("POLYGLU_THREADS")
    assert hardware.choose_threads().count == 2
    monkeypatch.setenv("POLYGLU_THREADS", "two")
    with pytest.raises(ValueError, match="POLYGLU_THREADS must be a positive integer, got 'two'"):
        hardware.choose_threads()
    with pytest.raises(ValueError, match="train.threads"):
        hardware.choose_threads(0)


def test_auto_threads_follow_affinity_and_load_once_per_process(monkeypatch, fresh):
    monkeypatch.delenv("POLYGLU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: None)
    load = [1.0]
    monkeypatch.setattr(hardware, "_machine_load", lambda: load[0])
    chosen = hardware.choose_threads()
    assert chosen.count == 3 and "4 CPUs in this process's affinity" in chosen.reason and "load 1.0" in chosen.reason
    load[0] = 0.0  # later calls keep the first choice (the load then includes this process's own work)
    assert hardware.choose_threads() == chosen
    hardware._auto_threads.cache_clear()
    monkeypatch.setattr(hardware, "_cgroup_cpu_quota", lambda: 2)
    assert hardware.choose_threads().count == 2


def test_the_load_is_what_runs_now_not_the_last_minutes_average(monkeypatch):
    """A job that just ended (`make setup` before `make demo`) leaves the 1-minute average high on an
    idle machine; the tasks running now are what a new thread would compete with."""
    assert hardware._running_now("0.90 0.45 0.20 1/187 4242\n") == 0  # only the reader runs
    assert hardware._running_now("3.10 2.00 1.00 3/190 4242\n") == 2
    assert hardware._running_now("garbage") is None
    reads = iter(["0.9 0.5 0.2 1/10 1", "0.9 0.5 0.2 3/10 1", "0.9 0.5 0.2 1/10 1"])
    monkeypatch.setattr(hardware.Path, "read_text", lambda self: next(reads))
    monkeypatch.setattr(hardware.time, "sleep", lambda s: None)
    assert hardware._machine_load() == 0.0  # the median of three reads: a passing task does not count
    assert hardware.free_threads(2, 0.0, 2) == 2 and hardware.free_threads(2, 0.9, 2) == 1
    monkeypatch.setattr(hardware.Path, "read_text", lambda self: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert hardware._machine_load() == 1.5  # off Linux: the 1-minute average


def test_environment_names_what_benchmarks_record():
    info = hardware.environment("cpu", dtype="float32")
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert isinstance(info["bf16_native"], bool) and info["dtype"] == "float32"
    line = hardware.describe_environment(info)
    assert info["cpu_capability"] in line and "dtype float32" in line


def test_training_logs_and_records_precision_and_threads(tiny_config, run_dir, fresh):
    from polyglu.config import RunConfig
    from polyglu.train.trainer import Trainer

    class Data:
        def get_batch(self, step, micro_step=0):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(0, tiny_config.vocab_size, (2, 17), generator=g)
            return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": torch.zeros(2, 16, dtype=torch.long)}

    from polyglu.model.transformer import PolychromaticLM

    model = {"preset": "debug", **{k: getattr(tiny_config, k) for k in ("vocab_size", "d_model", "d_ff", "n_heads",
                                                                        "n_kv_heads", "head_dim", "gate_hidden")}}
    config = RunConfig.load(None, [f"run_dir={run_dir}"], model=model, train={
        "max_steps": 1, "batch_size": 2, "warmup_steps": 0, "progress": False, "threads": 1, "dtype": "float32",
        "log_every": 1, "eval_every": 1, "checkpoint_every": 1})
    lines = []
    trainer = Trainer(config, PolychromaticLM(tiny_config), Data(), log=lines.append)
    assert trainer.autocast_dtype is None
    assert any(line.startswith("dtype float32 (float32: asked); threads 1 (train.threads)") for line in lines)
    trainer.fit()
    entry = json.loads((run_dir / "run_config_history.jsonl").read_text().splitlines()[-1])
    assert entry["environment"]["precision"] == {"name": "float32", "requested": "float32", "reason": "asked"}
    assert entry["environment"]["threads"]["count"] == 1
    assert entry["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args", [
    ("train_step.py", ["--preset", "debug", "--layers", "1", "--batch", "1", "--seq-len", "16", "--steps", "1",
                       "--warmup", "0", "--threads", "1", "--json"]),
    ("ffn.py", ["--batch", "1", "--seq-len", "8", "--d-model", "16", "--d-ff", "32", "--repeats", "1", "--warmup", "0",
                "--fused-kernels", "chunked", "--skip-reference", "--threads", "1", "--json"]),
])
def test_benchmarks_record_the_environment_and_resolve_dtype_auto(script, args):
    """A benchmark's JSON carries the CPU capability, bf16-native, dtype (auto resolved), threads and torch."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    environment = result["environment"]
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["threads"] == 1 and environment["torch"] == torch.__version__
    assert environment["bf16_native"] == hardware.cpu_bf16_native()[0]
    assert environment["dtype"] == hardware.choose_precision("auto", "cpu").name == result["setup"]["dtype"]
    if script == "train_step.py":  # the ratio of each step pair, PolyGLU's step over the SwiGLU step before it
        times = {ffn: r["samples_s"] for ffn, r in result["results"].items()}
        pairs = [p / s for s, p in zip(times["swiglu"], times["polyglu"])]
        assert result["polyglu_over_swiglu_time"]["paired_median"] == pytest.approx(statistics.median(pairs))


def test_every_benchmark_records_the_environment():
    """Each script under benchmarks/ prints and records `hardware.environment` (the two above run for real)."""
    for script in sorted(BENCHMARKS.glob("*.py")):
        source = script.read_text()
        assert "hardware.environment(" in source and "hardware.describe_environment(" in source, script.name


def test_inference_loading_chooses_float32_on_cpu_and_says_why(model, tmp_path):
    from polyglu.data.tokenizer import load_tokenizer
    from polyglu.loading import load_model_and_tokenizer

    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")  # stored in bf16
    model.float()
    load_tokenizer("byte").save(tmp_path / "model" / "tokenizer")
    lines = []
    loaded, _ = load_model_and_tokenizer(tmp_path / "model", device="cpu", log=lines.append)
    assert loaded.embed_tokens.weight.dtype == torch.float32
    assert lines == ["dtype float32 (auto: CPU inference runs its float32 kernels)"]
    loaded, _ = load_model_and_tokenizer(tmp_path / "model", device="cpu", dtype="float16", log=lines.append)
    assert loaded.embed_tokens.weight.dtype == torch.float16 and lines[-1] == "dtype float16 (float16: asked)"


def test_the_inference_notice_is_for_a_terminal_only(monkeypatch, capsys):
    from polyglu.commands.common import inference_notice

    inference_notice("dtype float32 (auto: ...)")
    assert capsys.readouterr().err == ""  # captured stderr: error output stays one line
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    inference_notice("dtype float32 (auto: ...)")
    assert capsys.readouterr().err == "polyglu: dtype float32 (auto: ...)\n"


def test_a_bad_polyglu_threads_stops_a_run_before_it_writes(monkeypatch, tmp_path, fresh):
    from polyglu.config import RunConfig
    from polyglu.train.setup import build_run

    monkeypatch.setenv("POLYGLU_THREADS", "0")
    config = RunConfig.load(None, [f"run_dir={tmp_path / 'run'}", "data.builtin=math",
                                   f"data.builtin_dir={tmp_path / 'data'}"])
    with pytest.raises(ValueError, match="POLYGLU_THREADS must be a positive integer, got '0'"):
        build_run(config, log=lambda *a: None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
