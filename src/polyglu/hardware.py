"""What this machine computes fast: the precision and the number of CPU threads to run with.

One owner for two choices every verb makes:

- **precision** (`choose_precision`): `auto` (the default everywhere a dtype is chosen for compute)
  is bfloat16 only where the device computes it natively: CUDA with bf16, or a CPU whose oneDNN has
  native bf16 (`cpu_bf16_native`, asked through torch's own probes, not /proc/cpuinfo). Everywhere
  else float32: without native bf16 every bf16 matmul is emulated, measured 8.3x slower than float32
  per demo training step on AVX2. An explicit `bfloat16` on such a CPU still runs, with one warning.
- **threads** (`choose_threads`): `train.threads`, else the environment variable POLYGLU_THREADS, else
  OMP_NUM_THREADS (torchrun sets it per process), else the CPUs this process may run on (its
  affinity, capped by a cgroup CPU quota) less those the rest of the machine keeps busy now (tasks
  running, read from /proc/loadavg; the 1-minute load average off Linux). On 2 idle cores the demo
  trains 1.4-1.6x faster on 2 threads, while one busy core made 2 threads 6.7x slower than 1
  (docs/performance.md).

`environment()` is what every benchmark prints and records: CPU capability, bf16-native, threads,
torch version.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "float32", "bfloat16")
THREADS_ENV = "POLYGLU_THREADS"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_warned_emulated_bf16 = False


@functools.cache
def cpu_bf16_native() -> tuple[bool, str]:
    """(whether this process's CPU kernels compute bf16 natively, why). True needs oneDNN's own probe
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`), torch running its AVX-512 kernels on x86 (not
    lowered by ATEN_CPU_CAPABILITY), oneDNN not capped below AVX-512 (ONEDNN_MAX_CPU_ISA) and, where
    torch lists CPU features (torch >= 2.6), the AVX-512 BF16 or AMX-BF16 instructions themselves
    (plain AVX-512 passes oneDNN's probe but converts every bf16 value in software)."""
    capability = cpu_capability()
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN"
    try:
        probe = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False, "this torch has no oneDNN bf16 probe"
    if not probe:
        return False, f"oneDNN has no native bf16 on this CPU (torch kernels: {capability})"
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        if not capability.startswith("AVX512"):
            return False, f"torch runs its {capability} kernels (ATEN_CPU_CAPABILITY), not AVX-512"
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
        if isa and isa != "ALL" and "AVX512" not in isa and "AMX" not in isa:
            return False, f"oneDNN is capped at {isa} (ONEDNN_MAX_CPU_ISA)"
        features = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else None
        if features is not None and not (features.get("avx512_bf16") or features.get("amx_bf16")):
            return False, "AVX-512 without its BF16 instructions: bf16 would be converted in software"
    return True, f"native bf16 (oneDNN, {capability})"


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels run with: 'AVX512', 'AVX2', 'DEFAULT', ... (what
    ATEN_CPU_CAPABILITY can lower)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # very old torch
        return "unknown"


def bf16_native(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, why)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, "CUDA with bf16"
        return False, "this CUDA device has no bf16"
    if device.type == "cpu":
        return cpu_bf16_native()
    return False, f"no bf16 probe for {device.type}"


@dataclass(frozen=True)
class Precision:
    """The compute dtype chosen, what was asked and why."""

    name: str  # "float32" | "bfloat16" | "float16"
    requested: str  # "auto" or the explicit name
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def describe(self) -> str:
        return f"dtype {self.name} ({self.requested}: {self.reason})"


def choose_precision(requested: str | None, device: torch.device | str, purpose: str = "training") -> Precision:
    """The compute dtype for `device`: `requested` ("auto"/None, "float32", "bfloat16"; "float16" for
    inference weights). `purpose` "training" (bf16 autocast where native) or "inference" (the
    weights' dtype: bf16 on CUDA where native; float32 on CPU, where the decode paths, the native
    kernels and the column-major decode layout, are float32 and batch-1 decoding is bound by per-op
    overhead rather than matmul throughput). An explicit bfloat16 on a CPU without native bf16 runs,
    with one warning per process."""
    if purpose not in ("training", "inference"):
        raise ValueError(f"purpose must be 'training' or 'inference', got {purpose!r}")
    requested = "auto" if requested is None else str(requested).removeprefix("torch.")
    device = torch.device(device)
    native, why = bf16_native(device)
    if requested == "auto":
        if purpose == "inference" and device.type == "cpu":
            return Precision("float32", "auto", "CPU inference runs its float32 kernels")
        if native:
            return Precision("bfloat16", "auto", why)
        return Precision("float32", "auto", f"no native bf16: {why}")
    if requested not in _DTYPES or (requested == "float16" and purpose == "training"):
        known = ", ".join(PRECISIONS if purpose == "training" else (*PRECISIONS, "float16"))
        raise ValueError(f"unknown dtype {requested!r} (known: {known})")
    if requested == "bfloat16" and device.type == "cpu" and not native:
        warn_emulated_bf16(why)
        return Precision("bfloat16", "bfloat16", f"asked; emulated: {why}")
    return Precision(requested, requested, "asked")


def warn_emulated_bf16(why: str) -> None:
    """Once per process: bf16 asked on a CPU that emulates it."""
    global _warned_emulated_bf16
    if _warned_emulated_bf16:
        return
    _warned_emulated_bf16 = True
    warnings.warn(f"bfloat16 on this CPU is emulated ({why}): several times slower than float32 "
                  f"(8.3x per demo training step on AVX2); dtype auto or float32 is faster here",
                  RuntimeWarning, stacklevel=3)


# ---- threads


@dataclass(frozen=True)
class Threads:
    count: int
    reason: str

    def describe(self) -> str:
        return f"threads {self.count} ({self.reason})"


def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may run on, why): its affinity (`os.sched_getaffinity`; os.cpu_count()
    where the platform has none), capped by a cgroup v2 CPU quota (`cpu.max`) when one is set."""
    if hasattr(os, "sched_getaffinity"):
        count, source = len(os.sched_getaffinity(0)), "affinity"
    else:
        count, source = os.cpu_count() or 1, "cpu_count"
    quota = _cgroup_cpu_quota()
    if quota is not None and quota < count:
        return quota, f"cgroup CPU quota {quota} (affinity {count})"
    return count, f"{count} CPUs in this process's {source}"


def _cgroup_cpu_quota() -> int | None:
    try:
        fields = open("/sys/fs/cgroup/cpu.max").read().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        return max(1, math.ceil(int(fields[0]) / int(fields[1])))
    except (ValueError, ZeroDivisionError):
        return None


def _running_now(loadavg: str) -> int | None:
    """Tasks running or runnable on the machine besides the reader, from the text of /proc/loadavg
    (its fourth field, "running/total", counts the reading thread itself)."""
    try:
        return max(0, int(loadavg.split()[3].split("/")[0]) - 1)
    except (IndexError, ValueError):
        return None


def _machine_load(samples: int = 3, interval: float = 0.05) -> float | None:
    """The CPUs other work keeps busy now: the median of a few reads, 50 ms apart, of the running
    tasks in /proc/loadavg (Linux), else the 1-minute load average. The average lags by a minute:
    right after `make setup`, on an idle machine, it still said 0.9 and `make demo` trained on one
    of two cores (1.4-1.6x slower than two, benchmarks/threads.py)."""
    counts = []
    for i in range(samples):
        try:
            running = _running_now(Path("/proc/loadavg").read_text())
        except OSError:
            running = None
        if running is None:
            break
        counts.append(running)
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return float(statistics.median(counts))
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def free_threads(cpus: int, load: float | None, machine_cpus: int | None) -> int:
    """Threads for `cpus` usable CPUs when the machine's `machine_cpus` carry a `load`: the
    usable CPUs less their share of the load, rounded to the nearest, at least 1. An OpenMP region
    waits for its slowest thread, so a thread placed on a busy core slows every step."""
    if load is None or not machine_cpus:
        return cpus
    busy = load * min(1.0, cpus / machine_cpus)  # the load spreads over the whole machine
    return max(1, min(cpus, math.floor(cpus - busy + 0.5)))


def choose_threads(requested: int | None = None, source: str = "train.threads") -> Threads:
    """The number of CPU threads: `requested` (from `source`), else POLYGLU_THREADS, else
    OMP_NUM_THREADS, else `free_threads` of the usable CPUs. A bad POLYGLU_THREADS raises ValueError
    naming it."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise ValueError(f"{source} must be a positive integer or null (auto), got {requested!r}")
        return Threads(requested, source)
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit() or int(value) <= 0:
            if name == THREADS_ENV:
                raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
            continue  # OMP_NUM_THREADS may be a list ("4,2"): not ours to read
        return Threads(int(value), f"{name}={value}")
    return _auto_threads()


@functools.cache
def _auto_threads() -> Threads:
    # decided once per process: later the load counts this process's own work (the demo's fine-tuning
    # would see its pre-training as load)
    cpus, why = usable_cpus()
    load = _machine_load()
    count = free_threads(cpus, load, os.cpu_count())
    if load is None:
        return Threads(count, f"auto: {why}")
    return Threads(count, f"auto: {why}, load {load:.1f}")


def apply_threads(requested: int | None = None, source: str = "train.threads") -> Threads:
    """choose_threads, then torch.set_num_threads."""
    threads = choose_threads(requested, source)
    torch.set_num_threads(threads.count)
    return threads


# ---- what benchmarks record


def environment(device: torch.device | str = "cpu", dtype: str | None = None) -> dict:
    """CPU capability, bf16-native, dtype, threads and versions: what every benchmark prints and records."""
    native, why = bf16_native(device)
    info = {"cpu_capability": cpu_capability(), "bf16_native": native, "bf16_reason": why,
            "threads": torch.get_num_threads(), "usable_cpus": usable_cpus()[0], "torch": torch.__version__,
            "machine": platform.machine(), "processor": _processor_name(), "device": str(device)}
    if dtype is not None:
        info["dtype"] = dtype
    return info


def describe_environment(info: dict) -> str:
    """One line of `environment()`."""
    line = (f"{info['processor']}, torch {info['torch']} {info['cpu_capability']} kernels, "
            f"bf16 {'native' if info['bf16_native'] else 'not native'}, threads {info['threads']}")
    return line + (f", dtype {info['dtype']}" if "dtype" in info else "")


@functools.cache
def _processor_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_record(precision: Precision, threads: Threads, device: torch.device | str) -> dict:
    """What a training run records about the choices it ran with."""
    native, _ = bf16_native(device)
    return {"precision": asdict(precision), "threads": asdict(threads), "cpu_capability": cpu_capability(),
            "bf16_native": native, "torch": torch.__version__}
