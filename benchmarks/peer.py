"""polyglu against its peer: Hugging Face `Qwen3ForCausalLM` of the same shape, side by side.

Three models of one shape (a polyglu preset, `small` by default; random weights, nothing
downloaded): polyglu with PolyGLU, polyglu with SwiGLU, and transformers' Qwen3ForCausalLM built
from a Qwen3Config with the same sizes (Qwen3 is our architecture with SwiGLU). Measured in one
run, interleaved repeat by repeat (so machine load hits all alike):

- decode tokens/s at batch 1 and at batch 64: greedy, with the KV cache, a fixed number of new
  tokens (EOS disabled), prefill included; polyglu through `polyglu.generate`, Qwen3 through
  `model.generate`; also SwiGLU reading PolyGLU's tensors ("swiglu_shared", `shared_swiglu`), since
  two separately built models stream their weights a few per cent apart by where they were put;
- training-step time: forward, cross-entropy on the logits, backward, AdamW step (same loss code
  for all three).

Prints medians and ratios to Qwen3 (tokens/s: higher is better; step time: lower is better).

polyglu's models decode with their linear weights column-major on CPU, as polyglu's inference loader
(`polyglu.loading.load_model_and_tokenizer`) stores them (`PolychromaticLM.use_decode_layout`: same
values, the layout MKL's one-row product reads fastest); Qwen3 keeps transformers' layout.
`--qwen3-columns` adds a Qwen3 with the same layout, to show how much of a batch-1 lead is that.
The training step runs on freshly built models (row-major weights, as built) for all three.

    python benchmarks/peer.py                       # small preset, 3 repeats
    python benchmarks/peer.py --repeats 5 --threads 2
    python benchmarks/peer.py --compile             # also polyglu's compiled decode step, if present
    python benchmarks/peer.py --qwen3-columns       # also Qwen3 with column-major weights
    python benchmarks/peer.py --lockstep-steps 64   # also PolyGLU vs SwiGLU decode steps in lockstep
    python benchmarks/peer.py --preset debug --repeats 1 --new-tokens 4 --batch-new-tokens 2  # quick check
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polyglu import PolychromaticLM, generate, hardware  # noqa: E402
from polyglu.config import MODEL_PRESETS, ModelConfig  # noqa: E402
from polyglu.train.optim import default_optimizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=tuple(MODEL_PRESETS))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement and model (median)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall time, or this process's CPU time (meaningful with --threads 1 on a loaded machine)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens at batch 1")
    p.add_argument("--batch", type=int, default=64, help="the batched decoding's batch size")
    p.add_argument("--batch-new-tokens", type=int, default=16, help="new tokens at --batch")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--compile", action="store_true",
                   help="also time polyglu's compiled decode step (generate(compile=True)) for PolyGLU and SwiGLU")
    p.add_argument("--qwen3-columns", action="store_true",
                   help="also decode with a Qwen3 whose linear weights are column-major, as polyglu's inference loader stores them")
    p.add_argument("--lockstep-steps", type=int, default=0,
                   help="also time single batch-1 decode steps of PolyGLU and SwiGLU (sharing their other "
                        "weights) in lockstep, token by token, this many per round (e.g. 64)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    for name in ("repeats", "prompt_len", "new_tokens", "batch", "batch_new_tokens", "train_batch", "train_seq_len"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def qwen3_config(config: ModelConfig):
    """A transformers Qwen3Config with the sizes of a polyglu ModelConfig (EOS disabled)."""
    from transformers import Qwen3Config

    from polyglu.interop.hf_config import PolychromaticConfig

    # the standard transformers names of our fields: the one mapping the transformers wrapper uses
    sizes = {hf: getattr(config, ours) for hf, ours in PolychromaticConfig.attribute_map.items()}
    return Qwen3Config(vocab_size=config.vocab_size, head_dim=config.head_dim, rope_theta=config.rope_theta,
                       hidden_act="silu", attention_bias=False, use_sliding_window=False, eos_token_id=None,
                       bos_token_id=None, pad_token_id=0, **sizes)


def build_models(args) -> dict[str, torch.nn.Module]:
    from transformers import Qwen3ForCausalLM

    max_len = max(args.prompt_len + max(args.new_tokens, args.batch_new_tokens), args.train_seq_len)
    config = ModelConfig.from_preset(args.preset)
    config = config.replace(max_seq_len=max(config.max_seq_len, max_len))
    models = {}
    for name, ffn in (("polyglu", "polyglu"), ("swiglu", "swiglu")):
        torch.manual_seed(0)
        models[name] = PolychromaticLM(config.replace(ffn=ffn)).eval()
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM._from_config(qwen3_config(config), attn_implementation="sdpa").eval()
    qwen.generation_config.eos_token_id = None
    qwen.generation_config.pad_token_id = 0
    models["qwen3"] = qwen
    return models


def column_major_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose nn.Linear weights are stored column-major (same values)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous() and min(module.weight.shape) > 1:
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def decode_runner(name: str, model, prompts: torch.Tensor, new_tokens: int, compiled: bool = False):
    if name.startswith("qwen3"):
        mask = torch.ones_like(prompts)

        def run():
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, use_cache=True)
            assert out.shape[1] == prompts.shape[1] + new_tokens
    else:
        extra = {"compile": True} if compiled else {}

        def run():
            out = generate(model, prompts, new_tokens, eos_token_id=[], **extra)
            assert int(out.lengths.min()) == new_tokens
    return run


def train_runner(model, tokens: torch.Tensor):
    optimizer = default_optimizer(model)  # the trainer's AdamW (fused where torch has it)

    def run():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        model.eval()
        return float(loss.detach())
    return run


CLOCK = [time.perf_counter]  # --clock cpu: this process's CPU time (with --threads 1: the work done, whatever the load)


def interleaved(runners: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per run: one warm-up each, then `repeats` rounds running every model once."""
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = CLOCK[0]()
            run()
            times[name].append(CLOCK[0]() - start)
    return times


def lockstep_decode(models: dict, prompt: torch.Tensor, steps: int, rounds: int, compiled: bool) -> dict:
    """Seconds per batch-1 decode step, PolyGLU and SwiGLU alternating token by token (the order
    flips every token), so that the machine's load and its memory traffic hit both alike.

    The SwiGLU model reads PolyGLU's tensors for every weight the two share (attention, gate, up,
    down, norms, embeddings), so both stream the same memory: what differs is only the routing. Two
    separately allocated models differ by a few per cent in how fast MKL streams their weights
    (measured either way round, with the order they were built in), more than the effect measured.
    """
    from polyglu.inference import DecodeStep, KVCache

    polyglu = models["polyglu"]
    pair = {"polyglu": polyglu, "swiglu": shared_swiglu(polyglu)}
    step = {name: DecodeStep(model, compile=compiled) for name, model in pair.items()}
    times: dict[str, list[float]] = {name: [] for name in pair}
    with torch.no_grad():
        for round_ in range(rounds + 1):  # round 0 warms up (and compiles)
            state = {}
            for name, model in pair.items():
                cache = KVCache.for_model(model, 1, prompt.shape[1] + steps + 1)
                state[name] = (cache, model(prompt, cache=cache).logits[:, -1])
            for i in range(steps):
                for name in (pair if i % 2 == 0 else reversed(list(pair))):
                    cache, logits = state[name]
                    start = CLOCK[0]()
                    logits = step[name](logits.argmax(-1, keepdim=True), cache)
                    if round_:
                        times[name].append(CLOCK[0]() - start)
                    state[name] = (cache, logits)
    return times


def shared_swiglu(polyglu: PolychromaticLM) -> PolychromaticLM:
    """A SwiGLU model of polyglu's shape reading polyglu's tensors for every weight the two share
    (attention, gate, up, down, norms, embeddings: the same memory, in polyglu's layout)."""
    swiglu = PolychromaticLM(polyglu.config.replace(ffn="swiglu")).eval()
    missing, _ = swiglu.load_state_dict(polyglu.state_dict(), strict=False, assign=True)
    assert not missing, missing
    return swiglu


def native_kernels_in_use() -> bool:
    """Whether polyglu's eager CPU decoding took the native kernels (polyglu.model.native) in this run."""
    try:
        from polyglu.model import native
    except ImportError:  # a polyglu from before the native kernels
        return False
    return native.kernels() is not None


def has_compiled_decode() -> bool:
    return "compile" in inspect.signature(generate).parameters


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    models = build_models(args)
    for name in ("polyglu", "swiglu"):  # the layout polyglu's inference loader gives (load_model_and_tokenizer)
        models[name].use_decode_layout()
    vocab = models["polyglu"].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    results: dict = {}
    compiled = args.compile and has_compiled_decode()
    for label, batch, new_tokens in (("decode_batch1", 1, args.new_tokens),
                                     (f"decode_batch{args.batch}", args.batch, args.batch_new_tokens)):
        prompts = torch.randint(1, vocab, (batch, args.prompt_len), generator=gen)
        runners = {name: decode_runner(name, model, prompts, new_tokens) for name, model in models.items()}
        # SwiGLU on PolyGLU's own tensors: the comparison without where the allocator put each model
        runners["swiglu_shared"] = decode_runner("swiglu_shared", shared_swiglu(models["polyglu"]), prompts, new_tokens)
        if args.qwen3_columns:
            qwen3_columns = column_major_copy(models["qwen3"])
            runners["qwen3_columns"] = decode_runner("qwen3_columns", qwen3_columns, prompts, new_tokens)
        if compiled:
            for name in ("polyglu", "swiglu"):
                runners[f"{name}_compiled"] = decode_runner(name, models[name], prompts, new_tokens, True)
        times = interleaved(runners, args.repeats)
        results[label] = {name: {"median_s": statistics.median(t), "samples_s": t,
                                 "tokens_per_s": batch * new_tokens / statistics.median(t)}
                          for name, t in times.items()}
        results[label]["setup"] = {"batch": batch, "new_tokens": new_tokens, "prompt_len": args.prompt_len}
    if args.lockstep_steps:
        prompt = torch.randint(1, vocab, (1, args.prompt_len), generator=gen)
        for label, compile_ in (("decode_step_batch1_lockstep", False), ("decode_step_batch1_lockstep_compiled", True)):
            if compile_ and not compiled:
                continue
            times = lockstep_decode(models, prompt, args.lockstep_steps, args.repeats, compile_)
            results[label] = {name: {"median_s": statistics.median(t), "tokens_per_s": 1 / statistics.median(t),
                                     "steps": len(t)} for name, t in times.items()}
            results[label]["setup"] = {"batch": 1, "new_tokens": args.lockstep_steps, "prompt_len": args.prompt_len}
    if not args.skip_train:
        tokens = torch.randint(0, vocab, (args.train_batch, args.train_seq_len + 1), generator=gen)
        models = build_models(args)  # train all three as built (row-major weights)
        runners = {name: train_runner(model, tokens) for name, model in models.items()}
        times = interleaved(runners, args.repeats)
        results["train_step"] = {name: {"median_s": statistics.median(t), "samples_s": t,
                                        "tokens_per_s": tokens[:, 1:].numel() / statistics.median(t)}
                                 for name, t in times.items()}
        results["train_step"]["setup"] = {"batch": args.train_batch, "seq_len": args.train_seq_len}
    config = models["polyglu"].config
    import transformers

    setup = {"preset": args.preset, "d_model": config.d_model, "d_ff": config.d_ff, "n_layers": config.n_layers,
             "vocab_size": config.vocab_size, "repeats": args.repeats, "threads": torch.get_num_threads(),
             "clock": args.clock,
             "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
             "compiled_decode": compiled, "native_kernels": native_kernels_in_use(),
             "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}}
    environment = hardware.environment("cpu", "float32")
    if args.json:
        print(json.dumps({"setup": setup, "environment": environment, "results": results}, indent=2))
        return
    print(f"environment: {hardware.describe_environment(environment)}")
    print_table(setup, results)


def print_table(setup: dict, results: dict) -> None:
    print(f"peer: preset={setup['preset']} (d_model {setup['d_model']}, d_ff {setup['d_ff']}, {setup['n_layers']} "
          f"layers, vocab {setup['vocab_size']}), CPU threads={setup['threads']}, repeats={setup['repeats']} "
          f"(interleaved), torch {setup['torch']}, transformers {setup['transformers']}, native CPU kernels "
          f"{'on' if setup.get('native_kernels') else 'off (POLYGLU_NATIVE=0 or unavailable)'}")
    print(f"{'measure':<24} {'model':<18} {'median':>10} {'tokens/s':>10} {'vs qwen3':>9}")
    for label, rows in results.items():
        if "qwen3" not in rows:  # the lockstep decode steps: PolyGLU against SwiGLU only
            what = f"{label} (1x{rows['setup']['new_tokens']}, median of {rows['polyglu']['steps']} steps)"
            print(what)
            for name in ("polyglu", "swiglu"):
                print(f"{'':<24} {name:<18} {rows[name]['median_s'] * 1e3:>7.2f}ms {rows[name]['tokens_per_s']:>10.1f}")
            continue
        base = rows["qwen3"]
        what = (f"{label} ({rows['setup']['batch']}x{rows['setup'].get('new_tokens', rows['setup'].get('seq_len'))})")
        for name, r in rows.items():
            if name == "setup":
                continue
            # tokens/s ratio: > 1 means faster than Qwen3 (for the training step too)
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            print(f"{what:<24} {name:<18} {r['median_s'] * 1e3:>8.0f}ms {r['tokens_per_s']:>10.1f} {ratio:>8.2f}x")
            what = ""
    for label, rows in results.items():
        for suffix in ("", "_compiled"):
            if f"swiglu{suffix}" in rows:
                polyglu = rows[f"polyglu{suffix}"]["tokens_per_s"]
                ratio = f"{label}{suffix}: polyglu/swiglu speed {polyglu / rows[f'swiglu{suffix}']['tokens_per_s']:.3f}"
                if "qwen3" in rows:
                    ratio += f", polyglu/qwen3 speed {polyglu / rows['qwen3']['tokens_per_s']:.3f}"
                if suffix == "" and "swiglu_shared" in rows:
                    ratio += f", polyglu/swiglu (shared weights) speed {polyglu / rows['swiglu_shared']['tokens_per_s']:.3f}"
                print(ratio)


if __name__ == "__main__":
    main()
