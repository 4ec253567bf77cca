"""A run's settings: `RunConfig` (one file with sections `model`, `data`, `train`, plus `run_dir`,
`task`, `init_from`), `DataConfig` and `TrainSection` (torch-free).

Each is checked once, when it is built (`__post_init__`); files and `key=value` overrides are read by
`polyglu.config_loader`, the model section by `ModelConfig.from_section`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from polyglu.config_loader import ConfigError, load_config, to_jsonable
from polyglu.model_config import ModelConfig


@dataclass
class DataConfig:
    """Where tokens come from. With no `sources`, the built-in math corpus is generated and prepared
    inside the run directory (so `configs/debug.yaml` needs no other input)."""

    builtin: str = "math"
    builtin_dir: str | None = None  # where the built-in corpus, tokenizer and shards go (default run_dir/data)
    sources: dict[str, str] = field(default_factory=dict)  # name -> prepared token-shard directory
    mixture: dict[str, float] | None = None  # weights per source; default proportional to nothing: equal
    anneal_to: dict[str, float] | None = None  # mix to switch to after `anneal_at` of training
    anneal_at: float = 0.8
    validation: dict[str, str] = field(default_factory=dict)  # name -> held-out shard directory
    tokenizer: str = "byte"  # 'byte', 'train' (BPE on the built-in corpus), a directory or a hub name
    tokenizer_vocab_size: int = 1024  # for tokenizer: train
    seq_len: int = 256
    builtin_train: int = 20_000  # built-in corpus: problems per split
    builtin_validation: int = 1_000
    builtin_test: int = 500
    builtin_seed: int = 0
    # supervised fine-tuning
    sft_train: str | None = None  # JSONL (messages, or prompt/response fields); default: built-in chat split
    sft_validation: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    # SFT rows: true / best_fit (whole examples, each where it fits most tightly), in_order, false / none
    packing: bool | Literal["best_fit", "in_order", "none"] = True
    # tokenise only the first N training conversations (a short fine-tuning run reads a few thousand of
    # a large file; tokenising all of them first costs more than the run); None: all
    sft_max_examples: int | None = None
    # fine-tune (and validate) only on rows whose `difficulty` field is one of these (the built-in chat
    # split has difficulties 1-4); null: every row
    sft_difficulties: list[int] | None = None

    def __post_init__(self) -> None:
        if self.sft_difficulties is not None and (not self.sft_difficulties or any(
                isinstance(x, bool) or not isinstance(x, int) for x in self.sft_difficulties)):
            raise ConfigError(f"data.sft_difficulties must be a non-empty list of integers or null, "
                              f"got {self.sft_difficulties!r}")
        if self.sft_max_examples is not None and (isinstance(self.sft_max_examples, bool)
                                                  or not isinstance(self.sft_max_examples, int)
                                                  or self.sft_max_examples <= 0):
            raise ConfigError(f"data.sft_max_examples must be a positive integer or null, "
                              f"got {self.sft_max_examples!r}")


@dataclass
class TrainSection:
    max_steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per step; or set tokens_per_step
    tokens_per_step: int | None = None  # global target; grad_accum derived from it
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100  # a tenth of the default max_steps (paper-600m.yaml: 2000 of its steps)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_schedule: Literal["linear", "cosine", "exponential", "constant"] = "linear"
    freeze_tau: bool = False  # keep the model's saved tau (fine-tuning)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    routing_stats_every: int = 100
    checkpoint_every: int = 500
    # also save when this many minutes passed since the last save (None: by steps only), so that a crash
    # or a kill loses minutes, not the run, whatever the speed of a step
    checkpoint_minutes: float | None = 10.0
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    # auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, a CPU with AVX-512 BF16
    # or AMX), float32 elsewhere (polyglu.hardware.choose_precision); bfloat16 on other CPUs warns
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    loss_chunk_size: int = 2048
    # the loss kernel: "auto" (liger-kernel's fused linear cross-entropy for training on CUDA when the
    # [gpu] extra is installed, else chunked), "chunked", "fused"; see polyglu.train.loss
    loss_kernel: Literal["auto", "chunked", "fused"] = "auto"
    # pad the head to a multiple of this many rows inside the fused loss (128 on GPUs: aligned tiles
    # for an odd vocabulary); pad logits masked; the model and its checkpoints keep their vocabulary
    vocab_pad_multiple: int | None = None
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    # CPU threads; null: $POLYGLU_THREADS, else $OMP_NUM_THREADS, else the CPUs of this process's
    # affinity less the tasks running on the machine now (polyglu.hardware.choose_threads)
    threads: int | None = None
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "max_bad_steps", "loss_chunk_size", "routing_stats_every"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"train.{name} must be positive, got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        # nan passes `<= 0`, inf trains steps of NaN: every float setting is finite
        for name in ("lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip", "tau_start", "tau_end", *(
                f"betas[{i}]" for i in range(len(self.betas)))):
            value = self.betas[int(name[6])] if name.startswith("betas") else getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"train.{name} must be a finite number, got {value}")
        if self.vocab_pad_multiple is not None and self.vocab_pad_multiple <= 0:
            raise ConfigError(f"train.vocab_pad_multiple must be positive or null, got {self.vocab_pad_multiple}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ConfigError(f"train.checkpoint_minutes must be positive (or null), got {self.checkpoint_minutes}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise ConfigError("train.tau_start and train.tau_end must be positive")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"train.threads must be a positive integer or null (auto), got {self.threads}")


@dataclass
class RunConfig:
    """A training or fine-tuning run. `model` holds ModelConfig fields, optionally a `preset` name
    whose values the other fields override."""

    run_dir: str = "runs/debug"
    task: Literal["pretrain", "sft"] = "pretrain"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "debug"})
    init_from: str | None = None  # a model directory to start from (SFT, continued pre-training)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        # the model section is checked here, with its key names, and the ModelConfig kept (not a
        # field: it is what `model` describes, not a setting of its own)
        self._model: tuple[dict[str, Any], ModelConfig] | None = None
        self.model_config()

    def model_config(self) -> ModelConfig:
        """The ModelConfig the `model` section describes, built (and checked) once: each call returns
        a copy of it, built again only if the section has changed since."""
        if self._model is None or self._model[0] != self.model:
            self._model = (copy.deepcopy(self.model), ModelConfig.from_section(self.model))
        return copy.copy(self._model[1])

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None, **defaults: Any) -> RunConfig:
        """Read a YAML/JSON run config and apply dotted `key=value` overrides (values parsed as YAML)."""
        return load_config(cls, path, overrides, **defaults)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)
