"""The one door to torch.compile: every compile in polyglu goes through `compile_fn` or
`compile_module` (in place, so parameter names stay those of the module).

Why a door: inductor's on-disk caches (the FX graph and AOTAutograd caches, `/tmp/torchinductor_$USER`
by default) key a compiled graph by the graph, the inputs, torch's version and inductor's config, but
not by the CPU vector instruction set the C++ kernels were generated for. That instruction set is
picked per process (`torch._inductor.cpu_vec_isa.pick_vec_isa`), from the CPU and from
`ATEN_CPU_CAPABILITY`. A graph generated for AVX-512 (loops stepping 16 floats) and loaded by a
process that picked AVX2 is compiled with 8-float vectors: half of every output is never written
(NaN from the first steps, as seen training the demo with `ATEN_CPU_CAPABILITY=avx2` on an AVX-512
machine). A graph generated for AVX2 and loaded under AVX-512 stores 16 floats per 8-float step:
each kernel writes up to 60 bytes past its buffers (heap corruption, "double free or corruption",
as seen when the demo's fused kernel first compiled its exact routing form, step 413). Reproduced on
torch 2.13 with `ATEN_CPU_CAPABILITY=default` after an AVX2 run: the cached AVX2 source is handed to
a build without vector types and fails to compile (tests/test_compiler.py).

The workaround keeps the speed and changes no generated code: `pin_cpu_isa` sets inductor's
`cpp.simdlen` to the width of the instruction set inductor picks anyway. `cpp.simdlen` is part of
inductor's config, hence of every cache key, so graphs of different instruction sets no longer
share an entry.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch


def _pick_vec_isa():
    try:  # torch >= 2.5
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # torch 2.4
        from torch._inductor.codecache import pick_vec_isa
    return pick_vec_isa()


@functools.cache
def pin_cpu_isa() -> str:
    """Makes the CPU vector instruction set part of inductor's cache keys (see the module docstring),
    once per process. Returns what was pinned, e.g. "avx2 (simdlen 256)", or why nothing was."""
    try:
        import torch._inductor.config as inductor_config
    except ImportError:  # a torch build without inductor: nothing compiles, nothing to key
        return "no inductor"
    if inductor_config.cpp.simdlen is not None:
        return f"simdlen {inductor_config.cpp.simdlen} set by the user"
    try:
        picked = _pick_vec_isa()
    except Exception as e:  # probing compiles a small program; without a compiler nothing compiles anyway
        return f"no vector ISA probed ({type(e).__name__})"
    width = picked.bit_width() if picked else 0  # the invalid ISA (scalar code) is falsy, width 0
    inductor_config.cpp.simdlen = width
    if str(_pick_vec_isa()) != str(picked):
        # another ISA of the same width ranks first (AMX before AVX-512 when ATEN_CPU_CAPABILITY=avx512):
        # leave inductor's choice alone and key the caches by a tag instead, where torch has one
        inductor_config.cpp.simdlen = None
        compiler_config = getattr(torch.compiler, "config", None)
        if compiler_config is None or not hasattr(compiler_config, "cache_key_tag"):
            warnings.warn(f"polyglu: cannot key inductor's cache by the CPU instruction set {picked}; "
                          "clear the inductor cache (TORCHINDUCTOR_CACHE_DIR) after changing "
                          "ATEN_CPU_CAPABILITY", RuntimeWarning, stacklevel=2)
            return f"{picked} (not pinned)"
        compiler_config.cache_key_tag = f"{compiler_config.cache_key_tag}|cpu-isa={picked}"
        return f"{picked} (cache tag)"
    return f"{picked or 'scalar'} (simdlen {width})"


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """torch.compile(fn, **kwargs) with the CPU instruction set pinned in inductor's cache keys."""
    pin_cpu_isa()
    return torch.compile(fn, **kwargs)


def compile_module(module: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """module.compile(**kwargs) (in place: state-dict keys unchanged) with the CPU instruction set pinned."""
    pin_cpu_isa()
    module.compile(**kwargs)
    return module
