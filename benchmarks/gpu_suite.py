"""Every GPU figure of polyglu in one command: one JSON file and a printed table.

    python benchmarks/gpu_suite.py --out gpu.json                  # one H100: ~7 minutes, cold cache
    python benchmarks/gpu_suite.py --smoke --out smoke.json        # every part at tiny shapes on CPU
    python benchmarks/gpu_suite.py --parts ffn,kernel --out x.json
    python benchmarks/gpu_suite.py --with-eval --out gpu.json      # + generation and decoding (opt-in)

Default parts, in order (each guarded: an exception records its message under "errors" and the suite
goes on; each has a time budget; the JSON is rewritten after every part, so a killed run keeps what
it measured; a part that would start after --max-total-s is skipped and recorded):

- ffn: PolyGLU against SwiGLU blocks, bf16, 16 x 1024 tokens, d_model 1024 / d_ff 4096, training
  mode, each with its default CUDA kernel (the Triton kernel for both): `ffn_fwd_bwd_ratio`,
  `ffn_peak_memory_ratio` (peak CUDA memory, reset before each block). Reuses benchmarks/ffn.py.
- kernel: `kernel_max_error`: the Triton mixed-activation kernel against the plain reference,
  float32, output and all four gradients (max abs error); bf16 and the inductor kernel in details.
- attention: `attention_fwd_bwd_ms` {flex, sdpa_masked, sdpa_is_causal}: one layer's attention at the
  paper's heads, T = 4096, packed documents; flex and masked SDPA compute the same thing (their max
  difference in details), is_causal ignores the documents (the lower bound).
- compiled_block: `compiled_block_max_rel_error`: a two-layer model of the paper's width with its
  blocks compiled as the trainer compiles them against the same model eager, bf16 autocast, through
  the training loss: the loss and every parameter gradient.
- train: paper-600m through the trainer (`Trainer.train_step`: bf16 autocast, per-block
  torch.compile, fused loss, fused AdamW, no host sync per step), packed documents, T = 4096, the
  batch from a memory estimate (`estimate_batch`), a few dozen timed steps after warm-up:
  `train_tokens_per_s`, `train_mfu`, `train_step_ratio_vs_swiglu` (SwiGLU at the same batch),
  `train_peak_memory_gib` {polyglu, swiglu}, `train_compile_s` {polyglu, swiglu} (first steps,
  apart from the steady state), `train_top_kernels_ms` (profiler: the most expensive CUDA kernels of
  one PolyGLU step). MFU = (6 N tokens/s + attention FLOPs/s) / peak, N all parameters (tied
  embedding counted once), attention 12 * n_layers * n_heads * head_dim per attended (query, key)
  pair inside documents; peak = the device's dense bf16 peak (H100 SXM / H200: 989.4 TFLOP/s), or a
  measured bf16 matmul rate on an unknown device (stated in the JSON).

Opt-in, evaluation-style parts (`--with-eval`, or named in --parts):
- generate: `generate_1319x256_s`: paper-600m in bf16, causal pooling, 1,319 prompts of 48-200 random
  tokens (GSM8K's test size), 256 new greedy tokens each (EOS disabled), batched with the KV cache.
- generate_sequence_pool: `generate_1319x256_sequence_pool_s`: the same with sequence pooling (exact
  full recompute, O(T^2) per row); past its budget the rest is extrapolated and the JSON says so.
- decode: `decode_batch1_tokens_per_s` {eager, compiled}: one prompt, greedy, cached.

The JSON also holds "fallbacks" (which kernel each path really used, and whether anything fell back:
a failed compile, flex replaced by SDPA, a smaller batch after running out of memory) and "compile"
(graphs compiled, graph breaks and recompiles after warm-up). The allocator runs with
expandable_segments; inductor's and Triton's caches go to --cache-dir (default: gpu_suite_cache
beside --out), which a next run can be given to skip the compiles. docs/performance.md explains
every key.

`--smoke` runs every part on CPU at tiny shapes (debug-size models) with the same keys, in about a
minute: the check that the suite runs, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# before torch allocates anything: growable segments instead of fixed blocks (less fragmentation at
# the large, varying sizes of a training step)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # the working tree's polyglu, installed or not
sys.path.insert(0, str(HERE))  # benchmarks/ffn.py

PARTS = ("ffn", "kernel", "attention", "compiled_block", "train", "generate", "generate_sequence_pool", "decode")
EVAL_PARTS = ("generate", "generate_sequence_pool", "decode")  # opt-in: --with-eval or --parts
DEFAULT_PARTS = tuple(p for p in PARTS if p not in EVAL_PARTS)
KEYS = {
    "ffn": ("ffn_fwd_bwd_ratio", "ffn_peak_memory_ratio"),
    "kernel": ("kernel_max_error",),
    "attention": ("attention_fwd_bwd_ms",),
    "compiled_block": ("compiled_block_max_rel_error",),
    "train": ("train_tokens_per_s", "train_mfu", "train_step_ratio_vs_swiglu", "train_peak_memory_gib",
              "train_compile_s", "train_top_kernels_ms"),
    "generate": ("generate_1319x256_s",),
    "generate_sequence_pool": ("generate_1319x256_sequence_pool_s",),
    "decode": ("decode_batch1_tokens_per_s",),
}
GOALS = {
    "ffn_fwd_bwd_ratio": "<= 1.05",
    "ffn_peak_memory_ratio": "<= 1.0",
    "train_mfu": ">= 0.40 (H100)",
    "kernel_max_error": "< 1e-4",
    "compiled_block_max_rel_error": "< 5e-2 (bf16)",
    "generate_1319x256_s": "< 300",
}
# dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, without sparsity)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
                    ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))


@dataclass
class Shapes:
    """Everything that differs between the real run and --smoke."""

    device: str
    dtype: torch.dtype
    ffn: dict  # B, T, d_model, d_ff, repeats
    kernel: dict  # B, T, F
    train_preset: str
    train_overrides: dict
    train_seq_len: int
    train_batches: tuple[int, ...]  # the candidates, largest first: the largest the memory estimate allows
    train_doc_len: tuple[int, int]  # packed documents' length range
    train_warmup: int
    train_steps: int
    train_compile: bool
    gen_preset: str
    gen_overrides: dict
    gen_prompts: int
    gen_prompt_len: tuple[int, int]
    gen_new_tokens: int
    gen_batch_size: int
    decode_prompt_len: int
    decode_new_tokens: int
    attention: dict = field(default_factory=dict)  # B, T, H, Hkv, hd, doc_len, repeats
    block_seq_len: int = 4096  # compiled_block: tokens of its one row
    block_dtype: torch.dtype | None = None  # compiled_block's autocast dtype (None: `dtype`; float32: off)
    kernel_impl: str = "triton"  # the mixed-activation kernel checked against the reference
    compile_backend: str = "inductor"  # torch.compile backend where the suite compiles itself
    profile_steps: int = 1
    budgets_s: dict = field(default_factory=dict)


def full_shapes(device: str) -> Shapes:
    return Shapes(
        device=device, dtype=torch.bfloat16,
        ffn=dict(B=16, T=1024, d_model=1024, d_ff=4096, repeats=10),
        kernel=dict(B=4, T=1024, F=4096),
        train_preset="paper-600m", train_overrides={}, train_seq_len=4096, train_batches=(24, 16, 12, 8, 4, 2, 1),
        train_doc_len=(256, 2048), train_warmup=3, train_steps=20, train_compile=True,
        gen_preset="paper-600m", gen_overrides={}, gen_prompts=1319, gen_prompt_len=(48, 200), gen_new_tokens=256,
        gen_batch_size=1319, decode_prompt_len=64, decode_new_tokens=256,
        attention=dict(B=4, T=4096, H=16, Hkv=8, hd=64, doc_len=(256, 2048), repeats=10),
        # seconds; the defaults sum to 400, under --max-total-s 420 (a cold compile cache included)
        budgets_s=dict(ffn=35, kernel=20, attention=35, compiled_block=60, train=250, generate=45,
                       generate_sequence_pool=45, decode=60),
    )


TINY = dict(vocab_size=512, d_model=64, d_ff=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            max_seq_len=256, gate_hidden=16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _triton_installed()


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def smoke_shapes() -> Shapes:
    return Shapes(
        device="cpu", dtype=torch.bfloat16,
        ffn=dict(B=2, T=32, d_model=64, d_ff=128, repeats=2),
        kernel=dict(B=2, T=16, F=64),
        train_preset="debug", train_overrides=TINY, train_seq_len=64, train_batches=(4, 2),
        train_doc_len=(8, 40), train_warmup=1, train_steps=3, train_compile=False,
        gen_preset="debug", gen_overrides=TINY, gen_prompts=13, gen_prompt_len=(4, 12), gen_new_tokens=6,
        gen_batch_size=8, decode_prompt_len=8, decode_new_tokens=6,
        attention=dict(B=2, T=64, H=4, Hkv=2, hd=16, doc_len=(8, 40), repeats=2), block_seq_len=32,
        # float32: the traced block must equal the eager one to float rounding (bf16 rounding, amplified
        # at tiny shapes, would hide a real difference)
        block_dtype=torch.float32,
        # compiling with inductor on CPU costs minutes: the smoke run captures with dynamo's eager
        # backend (graph breaks and recompiles still counted); the Triton kernel runs under
        # TRITON_INTERPRET=1 when set, else "dense" (the kernel's graph before compilation)
        kernel_impl="triton" if _interpreting() else "dense", compile_backend="eager",
        budgets_s=dict(ffn=20, kernel=20, attention=20, compiled_block=30, train=30, generate=10,
                       generate_sequence_pool=10, decode=30),
    )


# --------------------------------------------------------------------------------------------
# helpers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom_type) or "out of memory" in str(error).lower()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): the datasheet's dense bf16 peak for known GPUs, else
    the rate of a large matmul measured here (so MFU is always a number, and says what it is)."""
    name = device_name(device)
    if device.startswith("cuda"):
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops * 1e12, f"datasheet dense bf16 peak of {key}: {tflops} TFLOP/s"
    n = 8192 if device.startswith("cuda") else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    sync(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - start)
    return rate, f"measured {n}^3 {str(dtype).removeprefix('torch.')} matmul on {name}: {rate / 1e12:.3f} TFLOP/s"


def make_prompts(n: int, length_range: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = length_range
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab, (length,), generator=gen).tolist() for length in lengths]
    return sorted(prompts, key=len, reverse=True)  # similar lengths share a batch: less padding


def build_model(preset: str, overrides: dict, device: str, dtype: torch.dtype | None, **changes):
    from polyglu import PolychromaticLM
    from polyglu.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, **{**overrides, **changes})
    with torch.device(device):
        model = PolychromaticLM(config)
    return model.to(dtype) if dtype is not None else model


class OverBudget(Exception):
    """Raised from a stream callback to stop a generation that ran past its time budget."""


# --------------------------------------------------------------------------------------------
# parts


def part_ffn(shapes: Shapes, budget_s: float) -> dict:
    import ffn as ffn_bench

    s = shapes.ffn
    dtype = str(shapes.dtype).removeprefix("torch.")
    args = ffn_bench.parse_args([
        "--batch", str(s["B"]), "--seq-len", str(s["T"]), "--d-model", str(s["d_model"]), "--d-ff", str(s["d_ff"]),
        "--device", shapes.device, "--dtype", dtype, "--repeats", str(s["repeats"]), "--warmup", "2",
        "--fused-kernels", "auto", "--skip-reference"])
    blocks = ffn_bench.build_blocks(args)
    results = ffn_bench.measure(blocks, args)
    fused = next(name for name in results if name.startswith("polyglu_fused"))
    ratio = results[fused]["ratio_to_swiglu"]
    peak = results[fused]["peak_bytes"], results["swiglu"]["peak_bytes"]
    if None not in peak:
        memory_ratio, memory_kind = peak[0] / peak[1], "peak CUDA memory of forward+backward"
    else:
        memory_ratio, memory_kind = ratio["saved_bytes"], "bytes saved for backward (no CUDA peak on this device)"
    return {"ffn_fwd_bwd_ratio": ratio["forward_backward_median"], "ffn_peak_memory_ratio": memory_ratio,
            "details": {"shape": s, "dtype": dtype, "block": fused, "memory_measure": memory_kind,
                        "forward_ratio": ratio["forward_median"], "fwd_bwd_min_ratio": ratio["forward_backward_min"],
                        "saved_bytes_ratio": ratio["saved_bytes"],
                        "fwd_bwd_median_ms": {k: v["forward_backward"]["median_s"] * 1e3 for k, v in results.items()},
                        "peak_mib": {k: (v["peak_bytes"] or 0) / 2**20 for k, v in results.items()}}}


def part_kernel(shapes: Shapes, budget_s: float) -> dict:
    from polyglu.model.fused import mixed_activation_fused
    from polyglu.model.polyglu import mixed_activation_reference

    s, device = shapes.kernel, shapes.device
    activations = ("relu", "tanh", "silu", "gelu")
    K = len(activations)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, dt=dtype, scale=1.0, gen=gen):
            return (torch.randn(*shape, device=device, generator=gen) * scale).to(dt).requires_grad_()

        gate, up = rand(s["B"], s["T"], s["F"], scale=2.0), rand(s["B"], s["T"], s["F"])
        alpha, dynamic = rand(s["F"], K, dt=torch.float32), rand(s["B"], s["T"], K, dt=torch.float32)
        noise = torch.randn(s["B"], s["F"], K, device=device, generator=gen)
        tau = torch.tensor(0.7, device=device)
        grad_out = torch.randn(s["B"], s["T"], s["F"], device=device, generator=gen).to(dtype)
        inputs = (gate, up, alpha, dynamic)
        outputs = {}
        for name, fn in (("compiled", lambda *a: mixed_activation_fused(*a, kernel=shapes.kernel_impl)),
                         ("reference", mixed_activation_reference)):
            h = fn(gate, up, alpha, dynamic, noise, tau, activations)
            grads = torch.autograd.grad(h, inputs, grad_out)
            outputs[name] = [h.detach().float(), *(g.float() for g in grads)]
        diffs = [float((a - b).abs().max()) for a, b in zip(outputs["compiled"], outputs["reference"])]
        scales = [float(b.abs().max()) for b in outputs["reference"]]
        errors[str(dtype).removeprefix("torch.")] = {
            "max_abs": max(diffs), "per_output": dict(zip(("h", "d_gate", "d_up", "d_alpha", "d_dynamic"), diffs)),
            "max_rel_to_output_max": max(d / max(m, 1e-30) for d, m in zip(diffs, scales))}
    return {"kernel_max_error": errors["float32"]["max_abs"],
            "details": {"shape": s, "kernel": shapes.kernel_impl, "activations": activations, "errors": errors,
                        "measure": "max |compiled - reference| over h and its 4 gradients (float32 inputs)"}}


class PackedDocuments:
    """Random tokens packed as documents of random lengths: a pure function of (step, micro_step),
    as the trainer's loaders are."""

    def __init__(self, vocab: int, batch_size: int, seq_len: int, doc_len: tuple[int, int]) -> None:
        self.vocab, self.batch_size, self.seq_len, self.doc_len = vocab, batch_size, seq_len, doc_len

    def get_batch(self, step: int, micro_step: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(step * 1000 + micro_step)
        ids = torch.randint(0, self.vocab, (self.batch_size, self.seq_len + 1), generator=gen)
        doc_ids = torch.empty(self.batch_size, self.seq_len, dtype=torch.long)
        for row in range(self.batch_size):
            start, doc = 0, 0
            while start < self.seq_len:
                length = int(torch.randint(self.doc_len[0], self.doc_len[1] + 1, (1,), generator=gen))
                doc_ids[row, start:start + length] = doc
                start, doc = start + length, doc + 1
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "doc_ids": doc_ids}


def attended_pairs(doc_ids: torch.Tensor) -> int:
    """(query, key) pairs causal attention inside documents computes: sum over documents of n(n+1)/2."""
    from polyglu.documents import segment_ids

    segments = segment_ids(doc_ids)
    total = 0
    for row in segments:
        counts = torch.bincount(row).double()
        total += int((counts * (counts + 1) / 2).sum())
    return total


def _trainer(shapes: Shapes, ffn: str, batch_size: int, attention: str, run_dir: str):
    from polyglu.config import RunConfig
    from polyglu.train.distributed import DistributedContext
    from polyglu.train.trainer import Trainer

    model_fields = {"preset": shapes.train_preset, **shapes.train_overrides, "ffn": ffn,
                    "attention_backend": attention}
    config = RunConfig.load(None, [f"run_dir={run_dir}"], model=model_fields, train={
        "max_steps": 10_000, "batch_size": batch_size, "lr": 1e-4, "warmup_steps": 10, "progress": False,
        "dtype": "bfloat16" if shapes.dtype == torch.bfloat16 else "float32", "compile": shapes.train_compile,
        "vocab_pad_multiple": 128}, data={"seq_len": shapes.train_seq_len})
    model = build_model(shapes.train_preset, shapes.train_overrides, shapes.device, None, ffn=ffn,
                        attention_backend=attention)
    data = PackedDocuments(model.config.vocab_size, batch_size, shapes.train_seq_len, shapes.train_doc_len)
    return Trainer(config, model, data, dist=DistributedContext.from_env(shapes.device), log=lambda *a: None)


def _time_steps(trainer, n_steps: int, warmup: int, deadline: float, device: str) -> list[float]:
    times = []
    for i in range(warmup + n_steps):
        sync(device)
        start = time.perf_counter()
        trainer.train_step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    trainer.read_step_counters()  # the skipped-step counters: a non-finite run raises here
    return times


def _dynamo_counts() -> dict[str, int]:
    """Graphs compiled so far, graph breaks and recompiles (dynamo's counters; private, informative)."""
    try:
        from torch._dynamo.utils import counters

        return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
                "graph_breaks": int(sum(counters["graph_break"].values())),
                "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0}
    except Exception:  # noqa: BLE001
        return {}


# bytes kept per token and layer for backward, in units of d_model and d_ff elements (bf16 autocast,
# compiled blocks, flash/flex attention): residual input (fp32) and norms, q/k/v/attention output,
# gate/up/hidden of the FFN; a safety factor covers temporaries and the allocator's slack
ACTIVATION_ELEMENTS = {"d_model_fp32": 2, "d_model_bf16": 8, "d_ff_bf16": 3}
SAFETY = 1.3


def estimate_batch(config, seq_len: int, candidates: tuple[int, ...], free_bytes: int) -> tuple[int, dict]:
    """The largest candidate batch whose estimated training memory fits in `free_bytes`: parameters,
    gradients and AdamW state in float32 (16 bytes per parameter) plus the activations kept for
    backward (`ACTIVATION_ELEMENTS` per token and layer) and one loss chunk. No compile, no trial step."""
    from polyglu.model.parameters import parameter_counts
    from polyglu.model.transformer import PolychromaticLM

    with torch.device("meta"):
        n_params = parameter_counts(PolychromaticLM(config))["total"]
    static = 16 * n_params
    e = ACTIVATION_ELEMENTS
    per_token = config.n_layers * (4 * e["d_model_fp32"] * config.d_model + 2 * e["d_model_bf16"] * config.d_model
                                   + 2 * e["d_ff_bf16"] * config.d_ff) + 4 * config.d_model
    per_sequence = SAFETY * per_token * seq_len
    loss_chunk = 4 * 2 * 2048 * config.vocab_size  # fused loss: a chunk of float32 logits and gradients
    fits = [b for b in candidates if static + loss_chunk + b * per_sequence <= free_bytes]
    batch = max(fits) if fits else min(candidates)
    return batch, {"parameters": n_params, "static_gib": static / 2**30, "per_sequence_gib": per_sequence / 2**30,
                   "free_gib": free_bytes / 2**30, "estimated_gib": (static + loss_chunk + batch * per_sequence) / 2**30}


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return 8 * 2**30  # CPU (smoke): a nominal 8 GiB


def _measure_trainer(shapes: Shapes, ffn: str, batch: int, attention: str, run_dir: str, deadline: float,
                     details: dict) -> tuple[object, list[float]]:
    """A trainer at `batch` (halved on out of memory, recorded as a fallback), its compile steps timed
    apart from the steady-state steps; peak memory reset before and recorded."""
    device = shapes.device
    while True:
        trainer = None
        free_memory(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer = _trainer(shapes, ffn, batch, attention, run_dir)
            start = time.perf_counter()
            _time_steps(trainer, 0, shapes.train_warmup, deadline, device)  # compiles, settles
            details.setdefault("compile_and_warmup_s", {})[ffn] = time.perf_counter() - start
            break
        except Exception as e:  # noqa: BLE001 - out of memory: half the batch, recorded
            trainer = None
            if not is_oom(e) or batch == 1:
                raise
            details.setdefault("fallbacks", []).append(f"{ffn}: batch {batch} ran out of memory")
            batch //= 2
    before = _dynamo_counts()
    times = _time_steps(trainer, shapes.train_steps, 0, deadline, device)
    after = _dynamo_counts()
    details.setdefault("dynamo_after_warmup", {})[ffn] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if device.startswith("cuda"):
        details.setdefault("peak_memory_gib", {})[ffn] = torch.cuda.max_memory_allocated() / 2**30
    return trainer, times


def _profile_step(trainer, device: str, top: int = 15) -> dict[str, float]:
    """ms per kernel (device time; CPU time on CPU) of one training step, the `top` most expensive."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        trainer.train_step()
        sync(device)
    attribute = "device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attribute, 0) > 0]
    if device.startswith("cuda"):  # kernels only, not the CPU-side ops that launch them
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return {e.key[:120]: getattr(e, attribute) / 1e3 for e in events[:top]}


def part_train(shapes: Shapes, budget_s: float) -> dict:
    from polyglu.config import ModelConfig
    from polyglu.model import fused

    device = shapes.device
    deadline = time.perf_counter() + budget_s
    # packed documents: "auto" is FlexAttention on CUDA (uncached forwards), SDPA with a mask on CPU
    attention = "auto"
    config = ModelConfig.from_preset(shapes.train_preset, **shapes.train_overrides)
    batch, estimate = estimate_batch(config, shapes.train_seq_len, shapes.train_batches, _free_bytes(device))
    details: dict = {"seq_len": shapes.train_seq_len, "doc_len_range": shapes.train_doc_len,
                     "compile": shapes.train_compile, "dtype": str(shapes.dtype).removeprefix("torch."),
                     "memory_estimate": estimate, "estimated_batch": batch}
    result = {}
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            trainer, times = _measure_trainer(shapes, "polyglu", batch, attention, run_dir,
                                              deadline - budget_s * 0.4, details)
        except Exception as e:  # noqa: BLE001
            if not device.startswith("cuda"):
                raise
            # FlexAttention failing (to compile) must not cost the training figures: SDPA with a mask
            details.setdefault("fallbacks", []).append(f"flex -> sdpa: {type(e).__name__}: {e}".splitlines()[0][:500])
            attention = "sdpa"
            trainer, times = _measure_trainer(shapes, "polyglu", batch, attention, run_dir,
                                              deadline - budget_s * 0.4, details)
        details["attention_backend"] = attention
        tokens_per_step = trainer.train_data.get_batch(0)["input_ids"].numel()
        pairs = statistics.mean(attended_pairs(trainer.train_data.get_batch(s)["doc_ids"]) for s in range(4))
        config = trainer.model.config
        n_params = trainer.model.num_parameters()["total"]
        step_s = statistics.median(times)
        attn_flops = 12 * config.n_layers * config.n_heads * config.head_dim * pairs  # per step, fwd+bwd
        flops_per_s = (6 * n_params * tokens_per_step + attn_flops) / step_s
        peak, peak_source = peak_flops(device, shapes.dtype)
        result.update(train_tokens_per_s=tokens_per_step / step_s, train_mfu=flops_per_s / peak,
                      train_top_kernels_ms=_profile_step(trainer, device))
        details.update(batch_size=trainer.tc.batch_size, tokens_per_step=tokens_per_step, parameters=n_params,
                       timed_steps=len(times), step_median_s=step_s, step_min_s=min(times),
                       attention_flops_share=attn_flops / (6 * n_params * tokens_per_step + attn_flops),
                       achieved_tflops=flops_per_s / 1e12, peak_tflops=peak / 1e12, peak_source=peak_source,
                       mixed_kernel="dense (inside the compiled blocks)" if shapes.train_compile
                       else fused.default_kernel(torch.empty(1, device=device)),
                       loss_kernel=_loss_kernel_name(trainer))
        batch_size = trainer.tc.batch_size
        trainer = None
        free_memory(device)
        # SwiGLU alone at the same batch (a dedicated GPU: no other load to interleave against)
        _, swiglu_times = _measure_trainer(shapes, "swiglu", batch_size, attention, run_dir, deadline, details)
        details.update(swiglu_step_median_s=statistics.median(swiglu_times), swiglu_timed_steps=len(swiglu_times))
        result["train_step_ratio_vs_swiglu"] = step_s / statistics.median(swiglu_times)
    warmups = details["compile_and_warmup_s"]
    # compile time apart from the steady state: the warm-up steps less what they would take warm
    result["train_compile_s"] = {name: max(0.0, seconds - shapes.train_warmup * (step_s if name == "polyglu" else
                                           details["swiglu_step_median_s"])) for name, seconds in warmups.items()}
    peaks = details.get("peak_memory_gib")
    if peaks:
        result["train_peak_memory_gib"] = peaks
    else:  # no CUDA: the memory estimate stands in, said so
        result["train_peak_memory_gib"] = {"polyglu": estimate["estimated_gib"], "swiglu": estimate["estimated_gib"]}
        details["peak_memory_note"] = "CPU: the estimate, not a measurement"
    result["details"] = details
    return result


def _loss_kernel_name(trainer) -> str:
    from polyglu.train.loss import loss_kernel

    weight = trainer.model.lm_head.weight
    hidden = torch.empty(1, weight.shape[1], device=weight.device, requires_grad=True)
    return loss_kernel(hidden, weight, trainer.tc.loss_kernel)


def part_attention(shapes: Shapes, budget_s: float) -> dict:
    """One layer's attention on packed documents: FlexAttention's block mask, SDPA with the dense mask
    (K/V heads repeated on CUDA: the memory-efficient kernel), SDPA is_causal (documents ignored)."""
    import torch.nn.functional as F

    from polyglu.documents import document_causal_mask
    from polyglu.model import flex
    from polyglu.model.attention import _sdpa

    a, device = shapes.attention, shapes.device
    data = PackedDocuments(100, a["B"], a["T"], a["doc_len"]).get_batch(0)
    doc_ids = data["doc_ids"].to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = shapes.dtype if device.startswith("cuda") else torch.float32
    backward = device.startswith("cuda")  # flex has no CPU backward: the smoke run times forwards
    q = torch.randn(a["B"], a["H"], a["T"], a["hd"], device=device, generator=gen).to(dtype).requires_grad_(backward)
    k, v = (torch.randn(a["B"], a["Hkv"], a["T"], a["hd"], device=device, generator=gen).to(dtype)
            .requires_grad_(backward) for _ in range(2))
    n_rep = a["H"] // a["Hkv"]
    block_mask = flex.document_block_mask(doc_ids, a["T"])
    dense = document_causal_mask(doc_ids)
    runs = {"flex": lambda: flex.flex_attention(q, k, v, block_mask),
            "sdpa_masked": lambda: _sdpa(q, k, v, dense, False, n_rep),
            "sdpa_is_causal": lambda: _sdpa(q, k, v, None, True, n_rep)}
    grad = torch.randn(a["B"], a["H"], a["T"], a["hd"], device=device, generator=gen).to(dtype)
    timings, outputs = {}, {}
    for name, run in runs.items():
        with torch.no_grad() if not backward else contextlib.nullcontext():
            out = run()  # warm-up (flex compiles here)
            if backward:
                torch.autograd.grad(out, (q, k, v), grad)
            outputs[name] = out.detach().float()
            times = []
            for _ in range(a["repeats"]):
                sync(device)
                start = time.perf_counter()
                out = run()
                if backward:
                    torch.autograd.grad(out, (q, k, v), grad)
                sync(device)
                times.append(time.perf_counter() - start)
        timings[name] = statistics.median(times) * 1e3
    ref = F.scaled_dot_product_attention(q.detach().float(), k.detach().float().repeat_interleave(n_rep, 1),
                                         v.detach().float().repeat_interleave(n_rep, 1), attn_mask=dense)
    return {"attention_fwd_bwd_ms": timings,
            "details": {"shape": a, "dtype": str(dtype).removeprefix("torch."), "backward": backward,
                        "max_error_vs_float32": {name: float((o - ref).abs().max()) for name, o in outputs.items()
                                                 if name != "sdpa_is_causal"},
                        "note": "sdpa_is_causal ignores document boundaries: a lower bound, not the same output"}}


def part_compiled_block(shapes: Shapes, budget_s: float) -> dict:
    """A two-layer model of the training shape with its blocks compiled as the trainer compiles them
    (`Block.compile()`, inductor on CUDA) against the same model eager, in training mode with the
    same noise seed under bf16 autocast, through the training loss (`LossModule`): the loss, and
    every parameter's gradient relative to its largest magnitude."""
    import copy

    from polyglu.train.trainer import LossModule

    device = shapes.device
    eager = build_model(shapes.train_preset, {**shapes.train_overrides, "n_layers": 2}, device, None,
                        attention_backend="auto").train()
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile(backend=shapes.compile_backend)
    T = shapes.block_seq_len
    batch = {k: v.to(device) for k, v in
             PackedDocuments(eager.config.vocab_size, 1, T, (T // 8, T // 2)).get_batch(0).items()}
    dtype = shapes.block_dtype or shapes.dtype
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    results, losses, first_call_s = {}, {}, {}
    for name, model in (("compiled", compiled), ("eager", eager)):
        loss_module = LossModule(model, 2048)
        torch.manual_seed(1)  # the same Gumbel noise
        start = time.perf_counter()
        with autocast:
            loss = loss_module(batch["input_ids"], batch["doc_ids"], batch["targets"])
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        sync(device)
        first_call_s[name] = time.perf_counter() - start
        losses[name] = float(loss.detach())
        results[name] = [g.float() if g is not None else None for g in grads]
    errors = {"loss": abs(losses["compiled"] - losses["eager"]) / abs(losses["eager"])}
    for (name, _), got, want in zip(eager.named_parameters(), results["compiled"], results["eager"]):
        if got is not None and want is not None:
            errors[name] = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
    return {"compiled_block_max_rel_error": max(errors.values()),
            "details": {"seq_len": T, "layers": 2, "backend": shapes.compile_backend, "first_call_s": first_call_s,
                        "dtype": str(dtype).removeprefix("torch."), "loss": losses, "rel_errors": errors,
                        "dynamo": _dynamo_counts()}}


def _timed_generation(model, prompts, new_tokens: int, batch_size: int, device: str, budget_s: float,
                      **kwargs) -> dict:
    """Greedy generation of all prompts, batch by batch, timing every decoding step through the
    stream callback; past the budget the run stops and the rest is extrapolated (see the docstring)."""
    from polyglu import generate

    step_times: list[tuple[int, float]] = []  # (sequence length of the step, seconds)
    total_steps = 0
    measured_s = 0.0
    start_all = time.perf_counter()
    stopped = False
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    batches_done = 0
    for batch in batches:
        P = max(len(p) for p in batch)
        last = [time.perf_counter()]
        step = [0]

        def stream(tokens, emitted, P=P, last=last, step=step):
            sync(device)
            now = time.perf_counter()
            step_times.append((P + step[0], now - last[0]))
            last[0] = now
            step[0] += 1
            if now - start_all > budget_s:
                raise OverBudget

        sync(device)
        batch_start = time.perf_counter()
        last[0] = batch_start
        try:
            out = generate(model, batch, new_tokens, eos_token_id=[], stream=stream, **kwargs)
            assert int(out.lengths.min()) == new_tokens
        except OverBudget:
            stopped = True
        sync(device)
        measured_s += time.perf_counter() - batch_start
        total_steps += step[0]
        if stopped:
            break
        batches_done += 1
    result = {"measured_s": measured_s, "steps_measured": total_steps, "batches": len(batches),
              "batches_done": batches_done, "extrapolated": stopped}
    if not stopped:
        result["seconds"] = measured_s
        return result
    # extrapolate: step time ~ a + b * sequence length (fitted on the steps after the first of each
    # batch, which includes the prefill), summed over the steps not run
    decode = [(length, s) for i, (length, s) in enumerate(step_times) if i > 0]
    lengths = torch.tensor([float(length) for length, _ in decode])
    seconds = torch.tensor([s for _, s in decode])
    if len(decode) >= 2 and float(lengths.std()) > 0:
        b = float(((lengths - lengths.mean()) * (seconds - seconds.mean())).sum() / ((lengths - lengths.mean()) ** 2).sum())
        a = float(seconds.mean()) - b * float(lengths.mean())
    else:
        a, b = float(seconds.mean()) if len(decode) else measured_s, 0.0
    prefill_s = step_times[0][1]
    remaining = 0.0
    for i, batch in enumerate(batches[batches_done:]):
        P = max(len(p) for p in batch)
        first = step_times[-1][0] - P + 1 if i == 0 else 0  # steps of the interrupted batch already run
        if i > 0:
            remaining += prefill_s * len(batch) / len(batches[0])
        remaining += sum(a + b * (P + t) for t in range(max(first, 1), new_tokens))
    result.update(seconds=measured_s + remaining, fit_a_s=a, fit_b_s_per_token=b)
    return result


def _generation_part(shapes: Shapes, budget_s: float, pool: str, use_cache: bool) -> dict:
    device = shapes.device
    model = build_model(shapes.gen_preset, shapes.gen_overrides, device, shapes.dtype, routing_pool=pool).eval()
    prompts = make_prompts(shapes.gen_prompts, shapes.gen_prompt_len, model.config.vocab_size)
    from polyglu import generate

    generate(model, prompts[:2], 2, eos_token_id=[])  # warm-up (lazily built tables, allocator)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timing = _timed_generation(model, prompts, shapes.gen_new_tokens, shapes.gen_batch_size, device, budget_s,
                               use_cache=use_cache)
    details = {"preset": shapes.gen_preset, "routing_pool": pool, "prompts": shapes.gen_prompts,
               "prompt_len_range": shapes.gen_prompt_len, "new_tokens": shapes.gen_new_tokens,
               "batch_size": shapes.gen_batch_size, "dtype": str(shapes.dtype).removeprefix("torch."),
               "path": "KV cache" if use_cache and pool != "sequence" else "full recompute", **timing,
               "generated_tokens_per_s": shapes.gen_prompts * shapes.gen_new_tokens / timing["seconds"]}
    if device.startswith("cuda"):
        details["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return {"seconds": timing["seconds"], "details": details}


def part_generate(shapes: Shapes, budget_s: float) -> dict:
    out = _generation_part(shapes, budget_s, "causal", use_cache=True)
    return {"generate_1319x256_s": out["seconds"], "details": out["details"]}


def part_generate_sequence_pool(shapes: Shapes, budget_s: float) -> dict:
    out = _generation_part(shapes, budget_s, "sequence", use_cache=True)  # sequence pooling always recomputes
    return {"generate_1319x256_sequence_pool_s": out["seconds"], "details": out["details"]}


def compiled_decode_support() -> str | None:
    """How this polyglu compiles decoding: "generate(compile=True)" when generate takes it, else None."""
    from polyglu import generate

    return "generate(compile=True)" if "compile" in inspect.signature(generate).parameters else None


def part_decode(shapes: Shapes, budget_s: float) -> dict:
    from polyglu import generate

    device = shapes.device
    model = build_model(shapes.gen_preset, shapes.gen_overrides, device, shapes.dtype).eval()
    prompt = make_prompts(1, (shapes.decode_prompt_len, shapes.decode_prompt_len), model.config.vocab_size)
    n = shapes.decode_new_tokens
    native = compiled_decode_support()
    # the smoke run checks the capture with a non-generating backend; inductor on CPU takes minutes
    compile_arg = True if shapes.compile_backend == "inductor" else shapes.compile_backend
    if native:
        runners = {"eager": lambda: generate(model, prompt, n, eos_token_id=[]),
                   "compiled": lambda: generate(model, prompt, n, eos_token_id=[], compile=compile_arg)}
        how = f"polyglu's compiled decode step: generate(..., compile={compile_arg!r})"
    else:
        compiled = torch.compile(model, dynamic=True, backend=shapes.compile_backend)
        runners = {"eager": lambda: generate(model, prompt, n, eos_token_id=[]),
                   "compiled": lambda: generate(compiled, prompt, n, eos_token_id=[])}
        how = (f"torch.compile(model, dynamic=True, backend={shapes.compile_backend!r}) passed to generate "
               f"(no compiled decode step in this polyglu)")
    details = {"prompt_len": shapes.decode_prompt_len, "new_tokens": n, "how_compiled": how, "warmup_s": {},
               "repeats": {}}
    rates = {}
    for name, run in runners.items():
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # e.g. "compiling failed: running eagerly"
            warnings.simplefilter("always")
            run()  # warm-up: compiles
        sync(device)
        details["warmup_s"][name] = time.perf_counter() - start
        details.setdefault("warnings", {})[name] = sorted({str(w.message).splitlines()[0][:300] for w in caught})
        times = []
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            out = run()
            sync(device)
            times.append(time.perf_counter() - start)
            assert int(out.lengths.min()) == n
        details["repeats"][name] = len(times)
        rates[name] = n / statistics.median(times)
    details["compiled_over_eager"] = rates["compiled"] / rates["eager"]
    return {"decode_batch1_tokens_per_s": rates, "details": details}


PART_FUNCTIONS: dict[str, Callable[[Shapes, float], dict]] = {
    "ffn": part_ffn, "kernel": part_kernel, "attention": part_attention, "compiled_block": part_compiled_block,
    "train": part_train, "generate": part_generate,
    "generate_sequence_pool": part_generate_sequence_pool, "decode": part_decode,
}


# --------------------------------------------------------------------------------------------
# driver


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a kill mid-write) never sees half a file."""
    from polyglu.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_suite.json", help="JSON file to write (default: %(default)s)")
    p.add_argument("--parts", default=None,
                   help=f"comma-separated subset of: {', '.join(PARTS)} (default: {', '.join(DEFAULT_PARTS)})")
    p.add_argument("--with-eval", action="store_true",
                   help=f"also the evaluation-style parts: {', '.join(EVAL_PARTS)}")
    p.add_argument("--cache-dir", default=None,
                   help="inductor's and Triton's compile caches (default: gpu_suite_cache beside --out); "
                        "give a next run the same directory to skip the compiles")
    p.add_argument("--smoke", action="store_true", help="every part at tiny shapes on CPU (a check, not a figure)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (--smoke: cpu)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    p.add_argument("--max-total-s", type=float, default=420.0,
                   help="a part that would start after this many seconds is skipped (recorded as an error); "
                        "compiles cannot be interrupted, so leave a margin below any hard limit")
    args = p.parse_args(argv)
    default = ",".join(DEFAULT_PARTS + (EVAL_PARTS if args.with_eval else ()))
    parts = [x.strip() for x in (args.parts or default).split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--parts: unknown part {unknown[0] if unknown else '(none)'!r}; known: {', '.join(PARTS)}")
    args.parts = parts
    out = Path(args.out)
    if not out.parent.is_dir():
        p.error(f"--out: directory {out.parent} does not exist")
    return args


def format_value(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {format_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        shapes = smoke_shapes()
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        shapes = full_shapes(device)
    if args.device and args.smoke:
        shapes.device = args.device
    out_path = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_path.parent / "gpu_suite_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # read when a compile happens (not at import): a carried directory skips the compiles. Restored
    # afterwards, so that an in-process caller (the tests) keeps its own.
    saved_env = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
    try:
        return _run(args, shapes, out_path, cache_dir)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(args, shapes: Shapes, out_path: Path, cache_dir: Path) -> int:
    report: dict = {
        "setup": {"smoke": args.smoke, "device": shapes.device, "device_name": device_name(shapes.device),
                  "torch": torch.__version__, "python": platform.python_version(), "parts": args.parts,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "compiled_decode": compiled_decode_support() or "none (torch.compile of the model)",
                  "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                  "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                  "inductor_cache_dir": os.environ["TORCHINDUCTOR_CACHE_DIR"],
                  "triton_cache_dir": os.environ["TRITON_CACHE_DIR"],
                  "cache_was_warm": any((cache_dir / "inductor").glob("*"))},
        "errors": {}, "seconds": {}, "details": {}, "fallbacks": {}, "compile": {},
    }
    for part in args.parts:
        for key in KEYS[part]:
            report[key] = None
    suite_start = time.perf_counter()
    for part in args.parts:
        elapsed = time.perf_counter() - suite_start
        if elapsed > args.max_total_s:
            report["errors"][part] = f"skipped: {elapsed:.0f} s spent, over --max-total-s {args.max_total_s:.0f}"
            continue
        budget = min(shapes.budgets_s.get(part, 60) * args.budget_scale, args.max_total_s - elapsed)
        print(f"[gpu_suite] {part} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = PART_FUNCTIONS[part](shapes, budget)
            report["details"][part] = result.pop("details", {})
            report.update(result)
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others
            report["errors"][part] = f"{type(e).__name__}: {e}"
            report["details"][part] = {"traceback": traceback.format_exc(limit=8)}
            print(f"[gpu_suite] {part} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        report["seconds"][part] = time.perf_counter() - start
        report["fallbacks"] = fallback_flags(shapes.device, report)
        report["compile"] = _dynamo_counts()
        free_memory(shapes.device)
        report["setup"]["total_s"] = time.perf_counter() - suite_start
        write_json(out_path, report)
    print_table(report)
    print(f"wrote {out_path}")
    return 0


def fallback_flags(device: str, report: dict) -> dict:
    """Which kernel each path uses here, and whether anything fell back (every flag false on a good run)."""
    from polyglu.model import fused, triton_mixed
    from polyglu.train import loss

    probe = torch.empty(1, 1, 1, device=device)
    train = report["details"].get("train", {})
    return {"mixed_kernel": fused.default_kernel(probe), "triton_installed": triton_mixed.available(),
            "fused_loss_available": loss.fused_available(),
            "loss_kernel": train.get("loss_kernel"),
            "mixed_kernel_compile_failed": bool(fused._compile_failed),
            "flex_replaced_by_sdpa": any("flex -> sdpa" in f for f in train.get("fallbacks", [])),
            "batch_halved_after_oom": any("out of memory" in f for f in train.get("fallbacks", [])),
            "recompiles_after_warmup": sum(v.get("recompiles", 0) + max(0, v.get("unique_graphs", 0))
                                           for v in train.get("dynamo_after_warmup", {}).values())}


def print_table(report: dict) -> None:
    setup = report["setup"]
    print(f"polyglu GPU suite: {setup['device_name']} ({setup['device']}), torch {setup['torch']}, "
          f"{'SMOKE (tiny shapes) ' if setup['smoke'] else ''}{setup['total_s']:.0f} s")
    print(f"{'figure':<36} {'value':<40} {'goal':<16}")
    for part in setup["parts"]:
        for key in KEYS[part]:
            value = report.get(key)
            shown = format_value(value) if value is not None else f"ERROR: {report['errors'].get(part, '?')[:60]}"
            print(f"{key:<36} {shown:<40} {GOALS.get(key, ''):<16}")
    with contextlib.suppress(KeyError, TypeError):
        d = report["details"]["train"]
        print(f"  train: batch {d['batch_size']} x {d['tokens_per_step'] // d['batch_size']} (estimated "
              f"{d['estimated_batch']}), {d['achieved_tflops']:.1f} TFLOP/s; peak: {d['peak_source']}")
    with contextlib.suppress(KeyError, TypeError, AttributeError):
        print("  top kernels of one PolyGLU training step (ms):")
        for name, ms in report["train_top_kernels_ms"].items():
            print(f"    {ms:9.2f}  {name[:100]}")
    print(f"  fallbacks: {report.get('fallbacks')}")


if __name__ == "__main__":
    sys.exit(main())
