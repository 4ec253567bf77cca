"""From a RunConfig to a ready Trainer: tokenizer, data (built-in corpus when no sources are given),
model (fresh, or `init_from` a model directory) and the distributed context."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from polyglu import hardware
from polyglu.config_loader import ConfigError
from polyglu.train import rundir
from polyglu.train.config import DataConfig, RunConfig
from polyglu.train.distributed import DistributedContext
from polyglu.train.loss import fused_available
from polyglu.train.trainer import Trainer


def builtin_data(config: RunConfig, log=print) -> dict[str, Any]:
    """The built-in corpus: tokenizer, text (pre-training, chat, test JSONL) and token shards under
    `data.builtin_dir` (default run_dir/data). Each piece is made once and reused."""
    from polyglu.data.prepare import prepare_builtin_math
    from polyglu.data.synthetic import generate_problems, pretraining_text
    from polyglu.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    d = config.data
    if d.builtin != "math":
        raise ConfigError(f"data.builtin: unknown built-in corpus {d.builtin!r} (known: math)")
    root = Path(d.builtin_dir) if d.builtin_dir else Path(config.run_dir) / "data"
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").is_file() and not any(tok_dir.glob("*.json")):
        if d.tokenizer == "train":
            log(f"training a BPE tokenizer (vocab {d.tokenizer_vocab_size}, single digits) on the built-in corpus")
            sample = root / "tokenizer_corpus.jsonl"
            sample.parent.mkdir(parents=True, exist_ok=True)
            with open(sample, "w") as f:
                for problem in generate_problems("train", min(d.builtin_train, 10_000), seed=d.builtin_seed):
                    f.write(json.dumps({"text": pretraining_text(problem)}) + "\n")
            train_bpe_tokenizer([sample], d.tokenizer_vocab_size, tok_dir)
        else:
            load_tokenizer(d.tokenizer).save(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    shards = root / "shards"
    manifest = prepare_builtin_math(tok_dir, shards, n_train=d.builtin_train, n_val=d.builtin_validation,
                                    n_test=d.builtin_test, seed=d.builtin_seed, log=log)
    files = {name: shards / rel for name, rel in manifest["builtin"]["files"].items()}
    return {"tokenizer": tokenizer, "tokenizer_dir": tok_dir, "paths": files,
            "shards": {"train": shards, "validation": shards}}


def sized_for_vocabulary(config: RunConfig, vocab_size: int | None) -> RunConfig:
    """`config` with the model's vocabulary following a tokenizer of `vocab_size` tokens (rounded up to
    a multiple of 64: friendlier matmul shapes) when its model section names none and the run trains a
    fresh model; a new config (`dataclasses.replace`), `config` itself unchanged."""
    if config.init_from or vocab_size is None or "vocab_size" in config.model:
        return config
    return dataclasses.replace(config, model={**config.model, "vocab_size": -(-vocab_size // 64) * 64})


def build_model(config: RunConfig, vocab_size: int | None = None):
    """(model, the run config it was built from): a fresh model of `config.model_config()` (its vocabulary
    following the tokenizer's, `sized_for_vocabulary`) seeded with `train.seed`, or the `init_from`
    model with the section's fields over its own. `config` is never changed."""
    from polyglu.loading import load_model
    from polyglu.model.transformer import PolychromaticLM

    if config.init_from:
        keep = {k: v for k, v in config.model.items() if k not in ("preset",)}
        model = load_model(config.init_from, **keep)
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise ConfigError(f"init_from {config.init_from}: model vocabulary {model.config.vocab_size} is "
                              f"smaller than the tokenizer's {vocab_size}")
        return model, config
    config = sized_for_vocabulary(config, vocab_size)
    torch.manual_seed(config.train.seed)
    return PolychromaticLM(config.model_config()), config


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a scheduler or taskset narrows)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_run_settings(config: RunConfig, overwrite: bool = False) -> None:
    """The run's settings against the machine and the file system, before anything is written (the
    values themselves are checked by the config classes): threads within the available CPUs,
    `init_from` not inside what `--overwrite` deletes, no held-out data that is also training data,
    no source given twice. ConfigError names the key. (Tokenizer, model and data agreement: see
    the data-preparation checks.)"""
    d, tc = config.data, config.train
    cpus = available_cpus()
    if tc.threads is not None and tc.threads > cpus:
        raise ConfigError(f"train.threads={tc.threads} exceeds the {cpus} CPUs available to this process "
                          f"(oversubscribed threads run many times slower); set train.threads={cpus} or less")
    if config.init_from and overwrite:
        start = Path(config.init_from).resolve()
        for name in rundir.RESULT_NAMES:
            doomed = (Path(config.run_dir) / name).resolve()
            if start == doomed or doomed in start.parents:
                raise ConfigError(f"init_from={config.init_from} lies inside {Path(config.run_dir) / name}, which "
                                  f"--overwrite deletes before training; copy that model elsewhere first and point "
                                  f"init_from there")

    def same(a: str, b: str) -> bool:
        return Path(a).resolve() == Path(b).resolve()

    seen: dict[Path, str] = {}
    for name, path in d.sources.items():
        key = Path(path).resolve()
        if key in seen:
            raise ConfigError(f"data.sources.{name} and data.sources.{seen[key]} are the same directory {path}; "
                              f"give each source once (weight it with data.mixture instead)")
        seen[key] = name
    for name, path in d.validation.items():
        twin = next((n for n, p in d.sources.items() if same(p, path)), None)
        if twin is not None:
            raise ConfigError(f"data.validation.{name} is data.sources.{twin} ({path}): validation on training "
                              f"data measures memorisation; name a held-out directory, or leave data.validation "
                              f"empty (each source's validation/ split or held-out tail is used)")
    if d.sft_train and d.sft_validation and same(d.sft_train, d.sft_validation):
        raise ConfigError(f"data.sft_validation is data.sft_train ({d.sft_train}): validation on training data "
                          f"measures memorisation; name a held-out file (or leave it unset)")


def check_loss_kernel(choice: str, device) -> None:
    """`train.loss_kernel: fused` only where it can run: liger-kernel installed, and CUDA (or CPU
    tensors under Triton's interpreter, TRITON_INTERPRET=1: how the tests run it). ConfigError
    otherwise, before anything is written; "auto" picks a kernel that runs."""
    if choice != "fused":
        return
    kind = torch.device(device).type
    # the device first: asking for liger-kernel imports triton, which reads TRITON_INTERPRET once
    if kind != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ConfigError(f"train.loss_kernel=fused runs Triton kernels on CUDA, not on {kind}; set "
                          f"train.loss_kernel=auto (the chunked loss off CUDA), or TRITON_INTERPRET=1 for "
                          f"Triton's interpreter (slow: for tests)")
    if not fused_available():
        raise ConfigError("train.loss_kernel=fused needs liger-kernel, which is not installed: pip install "
                          "'polyglu[gpu]' (CUDA machines), or set train.loss_kernel=auto")


def build_run(config: RunConfig, device: str | None = None, log=print, resume: bool | None = None,
              overwrite: bool = False) -> Trainer:
    """The Trainer of `config`, its run directory locked first (a second trainer there stops here,
    before anything is written). `resume=False` (a fresh start) refuses a run directory holding
    another run's results unless `overwrite`; None leaves the decision to resume()/fit()."""
    hardware.choose_threads(config.train.threads)  # a bad POLYGLU_THREADS stops here, before any data is written
    check_run_settings(config, overwrite)
    check_agreement(config)  # reads only: a refusal here leaves nothing behind, not even the run directory
    dist = DistributedContext.from_env(device)
    check_loss_kernel(config.train.loss_kernel, dist.device)
    if not dist.is_main:
        log = lambda *a, **k: None  # noqa: E731
    run_lock = rundir.RunLock(config.run_dir)
    rundir.on_main(dist, lambda: run_lock.acquire(log))
    try:
        if resume is False:
            rundir.on_main(dist, lambda: rundir.refuse_existing_results(config.run_dir, overwrite))
        return _build(config, dist, log, overwrite, run_lock)
    except BaseException:
        run_lock.release()  # a start that stops here leaves no lock file behind
        raise


def check_agreement(config: RunConfig) -> None:
    """Tokenizer, model and data fit one another, checked before anything is written: the rows
    (`data.seq_len`) within the model's context, the run's tokenizer the one `init_from` was trained
    with, its vocabulary within the model's, and ChatML markers for fine-tuning. One error lists
    every disagreement with both sides and the fix."""
    from polyglu.data.special_tokens import IM_END, IM_START
    from polyglu.data.tokenizer import describe_identity, load_tokenizer, same_tokenizer
    from polyglu.model_io import read_model_config

    d = config.data
    if config.init_from:
        model_config, _ = read_model_config(config.init_from)
        model_name = f"init_from {config.init_from}"
        model_tokenizer_dir = Path(config.init_from) / "tokenizer"
    else:
        model_config, model_name, model_tokenizer_dir = config.model_config(), "the model", None
    problems = []
    if d.seq_len > model_config.max_seq_len:
        problems.append(f"data.seq_len={d.seq_len} is longer than the context of {model_name} "
                        f"(max_seq_len={model_config.max_seq_len}): set data.seq_len={model_config.max_seq_len} "
                        f"or less" + ("" if config.init_from else f", or model.max_seq_len={d.seq_len}"))
    tokenizer = None
    if model_tokenizer_dir is not None and model_tokenizer_dir.is_dir():
        tokenizer = load_tokenizer(model_tokenizer_dir)  # the run goes on with the model's own tokenizer
        # fine-tuning text is tokenised with the model's tokenizer, so data.tokenizer may stay at its
        # default there; any tokenizer named explicitly (or used for pre-training shards) must be that one
        default_for_sft = config.task == "sft" and not d.sources and d.tokenizer == DataConfig.tokenizer
        if d.tokenizer != "train" and not default_for_sft:
            named = load_tokenizer(d.tokenizer)
            key = same_tokenizer(named.identity(), tokenizer.identity())
            if key is not None:
                problems.append(f"data.tokenizer={describe_identity(named.identity())} is not the "
                                f"tokenizer of {model_name} ({describe_identity(tokenizer.identity())}; they differ "
                                f"in {key}): set data.tokenizer={model_tokenizer_dir}")
    elif d.tokenizer != "train":  # "train": made from the built-in corpus for this run, fits by construction
        tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer is not None:
        vocab = model_config.vocab_size if (config.init_from or "vocab_size" in config.model) else None
        if vocab is not None and tokenizer.vocab_size > vocab:
            problems.append(f"the tokenizer {getattr(tokenizer, 'name', d.tokenizer)} has {tokenizer.vocab_size:,} "
                            f"tokens but {model_name} embeds {vocab:,} (vocab_size): use the model's tokenizer or "
                            f"a model of at least that vocabulary")
        missing = [t for t in (IM_START, IM_END) if tokenizer.token_id(t) is None]
        if config.task == "sft" and missing:
            problems.append(f"fine-tuning renders ChatML, but the tokenizer {getattr(tokenizer, 'name', '?')} has "
                            f"no {' or '.join(missing)} token: use a tokenizer trained by polyglu (polyglu "
                            f"tokenizer train) or one with ChatML markers")
    if problems:
        raise ConfigError(f"{config.task} run in {config.run_dir}: " + "; ".join(problems))


def _build(config: RunConfig, dist: DistributedContext, log, overwrite: bool, run_lock: rundir.RunLock) -> Trainer:
    from polyglu.data.loader import Mixture, PackedLoader
    from polyglu.data.tokenizer import load_tokenizer

    d, tc = config.data, config.train
    tokenizer_dir = None
    if d.sources and config.task == "pretrain":
        sources = dict(d.sources)
        # explicit held-out directories, else each source's validation/ (or held-out tail)
        validation = dict(d.validation) or dict(d.sources)
        tokenizer = load_tokenizer(d.tokenizer)
        builtin = None
    else:
        if dist.is_main:
            builtin = builtin_data(config, log)
        dist.barrier()
        if not dist.is_main:
            builtin = builtin_data(config, lambda *a, **k: None)
        tokenizer, tokenizer_dir = builtin["tokenizer"], builtin["tokenizer_dir"]
        sources = {"math": builtin["shards"]["train"]}
        validation = {"math": builtin["shards"]["validation"]}
        if config.init_from and (Path(config.init_from) / "tokenizer").is_dir():
            tokenizer_dir = Path(config.init_from) / "tokenizer"
            tokenizer = load_tokenizer(tokenizer_dir)
    model, config = build_model(config, tokenizer.vocab_size)

    if config.task == "pretrain":
        mixture = None
        if d.mixture or d.anneal_to:
            mixture = Mixture(d.mixture or {k: 1.0 for k in sources}, anneal_to=d.anneal_to, anneal_at=d.anneal_at)
        train_data = PackedLoader(sources, d.seq_len, tc.batch_size, seed=tc.seed, mixture=mixture,
                                  rank=dist.rank, world_size=dist.world_size, total_steps=tc.max_steps,
                                  tokenizer=tokenizer)
        # split="validation" reads DIR/validation/ when prepared, else each source's held-out tail
        val_split = "train" if d.validation else "validation"
        val_data = PackedLoader(validation, d.seq_len, tc.batch_size, seed=tc.seed + 1, rank=dist.rank,
                                world_size=dist.world_size, split=val_split, tokenizer=tokenizer) if validation else None
    else:
        from polyglu.data.chat import SFTDataset

        train_file = d.sft_train or builtin["paths"]["sft_train"]
        val_file = d.sft_validation or (builtin["paths"].get("sft_validation") if builtin else None)
        common = dict(tokenizer=tokenizer, seq_len=d.seq_len, batch_size=tc.batch_size, packing=d.packing,
                      prompt_field=d.prompt_field, response_field=d.response_field, rank=dist.rank,
                      world_size=dist.world_size, difficulties=d.sft_difficulties)
        train_data = SFTDataset(train_file, seed=tc.seed, max_examples=d.sft_max_examples, **common)
        val_data = SFTDataset(val_file, seed=tc.seed + 1, **common) if val_file else None
        log(train_data.describe() if hasattr(train_data, "describe") else f"SFT data: {train_file}")
    if tc.warmup_steps >= tc.max_steps:
        log(f"warning: train.warmup_steps={tc.warmup_steps} >= train.max_steps={tc.max_steps}: the learning "
            f"rate never leaves warm-up (set train.warmup_steps below max_steps)")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{config.task}: {n_params:,} parameters, ffn={model.config.ffn}, vocab={model.config.vocab_size}, "
        f"device={dist.device}, world_size={dist.world_size}")
    return Trainer(config, model, train_data, val_data, tokenizer_dir=tokenizer_dir, dist=dist, log=log,
                   overwrite=overwrite, run_lock=run_lock)
