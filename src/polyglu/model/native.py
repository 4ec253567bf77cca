"""Native CPU kernels, compiled once per torch version and CPU on first use: for small inference
calls (below), and for training (`polyglu.model.fused_native`: the mixed activation's forward and
one-pass backward, causal pooling and the routing network).

A batch-1 decode step on CPU spends its time in per-op overhead, not arithmetic: PolyGLU's routing
and mixed activation take ~20 eager ops a layer where SwiGLU takes two. `csrc/cpu_kernels.cpp`
does each in one call:

- `mixed_activation(gate, up, alpha, dynamic, tau, activations)`: sum_k g_k act_k(gate) * up with
  soft, noise-free routing, float32 (the "native" path of `polyglu.model.small_inference`);
- `decode_hidden(x, gate, up, ...)`: a PolyGLU layer's hidden activations for one decoded float32
  token per row: the causal pooling (continuing the cache's running sums in place), the routing
  network and the mixed activation (its "native-decode" path).

Which calls take them is decided in `polyglu.model.small_inference.choose`, nowhere else.

The library is built with the system's C++ compiler (`$CXX`, else `c++`) against the installed
torch, for the CPU capability torch runs with, into `$POLYGLU_CACHE_DIR` (default
`$XDG_CACHE_HOME/polyglu`, else `~/.cache/polyglu`) under `kernels/`, named by a hash of the source,
torch version, capability and flags; a build takes ~15 s and happens once. `POLYGLU_NATIVE` chooses:

- `auto` (default): build when first needed (one line on stderr says so); without a compiler, or
  if the build fails, warn once and compute with eager ops (the same math, ~10% slower decoding);
- `0` / `off`: never (eager ops only);
- `1` / `on`: require the kernels: an error if they cannot be built.

A build that takes longer than `POLYGLU_NATIVE_BUILD_TIMEOUT` seconds (default 300) is stopped,
compiler and all, and counts as a failed build (auto: a warning and eager ops).

`polyglu build-kernels` builds (or finds) the library now and prints its path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
# the activations the kernels compute, in the order of their codes in the source (enum Activation)
NATIVE_ACTIVATIONS = ("relu", "tanh", "silu", "gelu", "identity", "sigmoid")
MODES = {"auto": "auto", "": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off"}

# compiler flags for the vector instructions torch's own CPU kernels use (as torch.compile's C++ backend)
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


class NativeBuildError(OSError):
    """The native kernels could not be built or loaded (the message names the cause). An OSError:
    what is missing is in the environment (a compiler, a writable cache), so verbs print it as one line."""


def mode() -> str:
    """POLYGLU_NATIVE as one of "auto", "on", "off" (a ValueError naming the variable otherwise)."""
    value = os.environ.get("POLYGLU_NATIVE", "auto").strip().lower()
    if value not in MODES:
        raise ValueError(f"POLYGLU_NATIVE must be auto, 1/on or 0/off, got {value!r}")
    return MODES[value]


def cache_dir() -> Path:
    root = os.environ.get("POLYGLU_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "polyglu"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


# with AVX-512 where the CPU has the BF16 instructions (torch's feature list, torch >= 2.6): float32 ->
# bf16 in one instruction (vcvtneps2bf16, round to nearest even; values below bf16's smallest normal
# flush to 0) instead of eight. Every compiler that builds against torch's headers (GCC >= 9, Clang
# >= 9) takes the flag.
_BF16_FLAG = "-mavx512bf16"


def capability_flags(capability: str) -> list[str]:
    """The compiler flags of the kernels' vector code for torch's CPU capability (none: scalar code)."""
    flags = list(_CAPABILITY_FLAGS.get(capability, []))
    if capability == "AVX512" and hasattr(torch.cpu, "get_capabilities") \
            and torch.cpu.get_capabilities().get("avx512_bf16"):
        flags.append(_BF16_FLAG)
    return flags


def _command(output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    capability = torch.backends.cpu.get_cpu_capability()
    return [*shlex.split(compiler()), "-O3", "-std=c++17", "-fPIC", "-shared",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *capability_flags(capability), "-isystem", str(include),
            "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
            str(SOURCE), "-o", str(output), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def vector_code() -> str:
    """The vector instructions the kernels are compiled for: torch's own CPU capability when the
    build has flags for it, else portable scalar code (a CPU with neither AVX2 nor AVX-512, or
    ATEN_CPU_CAPABILITY=default)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in _CAPABILITY_FLAGS:
        return f"{capability} vector code"
    return f"scalar code (torch runs its {capability} kernels: no AVX2/AVX-512)"


def library_path() -> Path:
    """Where the library for this source, torch and CPU capability is (or will be) cached."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join([torch.__version__, torch.backends.cpu.get_cpu_capability(), sys.platform,
                            *_command(Path("out"))]).encode())
    return cache_dir() / "kernels" / f"polyglu_cpu-{digest.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compile the library to `library_path()` unless it is there (or `force`); returns the path.

    Concurrent builders wait for each other (a lock file beside it); the library is written under a
    temporary name and renamed into place, so a reader never sees a partial file."""
    path = library_path()
    if path.exists() and not force:
        return path
    if shutil.which(shlex.split(compiler())[0]) is None:
        raise NativeBuildError(f"no C++ compiler: {compiler()!r} is not on PATH (set CXX)")
    import fcntl  # POSIX only: imported here so that the module (and the eager path) loads anywhere

    path.parent.mkdir(parents=True, exist_ok=True)
    limit = build_timeout()
    with open(path.parent / ".build.lock", "w") as lock:
        _flock_within(lock, limit, fcntl)
        if path.exists() and not force:  # another process built it while this one waited
            return path
        print(f"polyglu: compiling the CPU kernels for torch {torch.__version__}, {vector_code()} (once, ~15 s) "
              f"-> {path}",
              file=sys.stderr, flush=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        log = path.with_suffix(".log")
        try:
            result = _run_within(_command(tmp), limit)
            if result.returncode != 0:
                log.write_text(" ".join(map(shlex.quote, _command(tmp))) + "\n" + result.stdout + result.stderr)
                errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
                first = errors[0].strip() if errors else f"exit status {result.returncode}"
                raise NativeBuildError(f"compiling {SOURCE.name} failed: {first} (full log: {log})")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def build_timeout() -> float:
    """Seconds a build may take (`POLYGLU_NATIVE_BUILD_TIMEOUT`, default 300): a compiler that never
    returns must not hang a plain `generate`."""
    raw = os.environ.get("POLYGLU_NATIVE_BUILD_TIMEOUT", "300")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"POLYGLU_NATIVE_BUILD_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _timeout_error(limit: float) -> NativeBuildError:
    return NativeBuildError(f"compiling {SOURCE.name} took longer than {limit:g} s and was stopped (is the compiler "
                            f"{compiler()!r} hanging?); set POLYGLU_NATIVE_BUILD_TIMEOUT to allow longer, or "
                            f"POLYGLU_NATIVE=0 to use eager ops")


def _run_within(command: list[str], limit: float) -> subprocess.CompletedProcess:
    """Run the compiler in its own process group; past `limit` seconds the whole group (the driver
    and the cc1plus it started) is killed and NativeBuildError says so."""
    import signal

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        process.communicate()
        raise _timeout_error(limit) from None
    except BaseException:  # Ctrl-C: leave no compiler behind
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _flock_within(lock, limit: float, fcntl) -> None:
    """Wait for another builder's lock at most `limit` seconds (its compiler has that long too)."""
    import time

    deadline = time.monotonic() + limit
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise _timeout_error(limit) from None
            time.sleep(0.1)


def _loaded() -> bool:
    return hasattr(torch.ops.polyglu_cpu, "mixed_activation")


def load(path: Path) -> None:
    """Load the library at `path` into this process (once: a second load of the same kernels is a no-op)."""
    if not _loaded():
        try:
            torch.ops.load_library(str(path))
        except OSError as e:  # e.g. a system library it links against changed since it was built
            raise NativeBuildError(f"cannot load {path} ({e}); rebuild it with: polyglu build-kernels --force") from e


logger = logging.getLogger(__name__)
_UNTRIED = object()
_kernels = _UNTRIED  # torch.ops.polyglu_cpu once loaded; None when unavailable (or switched off)
_loading = threading.Lock()  # threads decoding at once decide (and load) once


def kernels():
    """The loaded kernels (`torch.ops.polyglu_cpu`), building them on first use as POLYGLU_NATIVE
    says; None when they are off or unavailable (then warned once in "auto", an error in "on")."""
    global _kernels
    if _kernels is _UNTRIED:
        with _loading:
            if _kernels is _UNTRIED:
                _kernels = _load()
    return _kernels


def status() -> str:
    """"loaded", "unavailable" (tried and failed), "off" (POLYGLU_NATIVE) or "untried"; builds nothing."""
    if _kernels is _UNTRIED:
        return "off" if mode() == "off" else "untried"
    return "unavailable" if _kernels is None and mode() != "off" else ("off" if _kernels is None else "loaded")


def _load():
    setting = mode()
    if setting == "off":
        logger.info("polyglu: native CPU kernels off (POLYGLU_NATIVE=0): small inference calls use eager ops, "
                    "training the compiled kernel")
        return None
    try:
        path = build()
        load(path)
        logger.info("polyglu: native CPU kernels loaded from %s (parallel loops: %s)", path,
                    torch.ops.polyglu_cpu.threading())
        return torch.ops.polyglu_cpu
    except Exception as e:  # no compiler, a failed build, an unloadable library, a platform without fcntl
        if setting == "on":
            raise NativeBuildError(f"POLYGLU_NATIVE=on but the CPU kernels are unavailable: {e}") from e
        warnings.warn(f"polyglu: CPU kernels unavailable ({e}); small CPU inference calls use eager ops, "
                      "training the compiled kernel (set POLYGLU_NATIVE=0 to silence this)", RuntimeWarning,
                      stacklevel=3)
        return None


@functools.lru_cache(maxsize=64)  # a decode step asks once per layer
def activation_codes(activations: tuple[str, ...]) -> tuple[int, ...] | None:
    """The kernels' codes of `activations`, or None if one of them has no native code."""
    try:
        return tuple(NATIVE_ACTIVATIONS.index(name) for name in activations)
    except ValueError:
        return None
