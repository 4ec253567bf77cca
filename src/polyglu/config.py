"""Validated configuration dataclasses and presets.

Every size of PolychromaticLM is a preset of one `ModelConfig`. Configs read from YAML/JSON are
checked key by key: an unknown or mistyped key is an error that names it, never silently dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# every activation polyglu.model.activations defines, in its order (kept here, torch-free, for the CLI)
ACTIVATION_NAMES = ("relu", "tanh", "silu", "gelu", "gelu_tanh", "identity", "sigmoid", "softplus")
# what a PolyGLU layer mixes unless told otherwise: the paper's four
DEFAULT_ACTIVATIONS = ("relu", "tanh", "silu", "gelu")
FFN_KINDS = ("polyglu", "swiglu", "geglu", "reglu", "tanhglu")
ROUTING_POOLS = ("causal", "sequence", "token")
EVAL_ROUTING = ("soft", "hard")
MIXED_IMPLS = ("auto", "fused", "reference")
ROUTING_MODES = ("full", "static", "dynamic")
# whose dynamic routing logits: one K-vector per layer (the paper) or one per neuron (rank-r map)
ROUTING_SCOPES = ("layer", "neuron")
ATTENTION_BACKENDS = ("sdpa", "flex", "auto")
# Pools whose value at position t reads only positions <= t. Any other pool (the original "sequence",
# or one added to ROUTING_POOLS and not here) counts as non-causal: generation recomputes it every
# step instead of decoding it wrongly with a cache.
CAUSAL_ROUTING_POOLS = ("causal", "token")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


def routing_is_causal(routing_pool: str, *, n_activations: int = 2, routing_mode: str = "full") -> bool:
    """Whether a feed-forward's routing at position t reads only positions <= t, so that a KV cache
    decodes it exactly (the one answer to "is this pooling causal?").

    True for a pool in CAUSAL_ROUTING_POOLS, and whenever the pool is never read: one activation
    (the softmax over one is 1) or static routing (alpha only, no gate_net).
    """
    if routing_pool not in ROUTING_POOLS:
        raise ConfigError(f"routing_pool must be one of {ROUTING_POOLS}, got {routing_pool!r}")
    return routing_pool in CAUSAL_ROUTING_POOLS or n_activations == 1 or routing_mode == "static"


# --------------------------------------------------------------------------------------------
# generic dict -> dataclass conversion with strict key and type checks


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) `value` against a type annotation. Returns (ok, value)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True, value
    if origin is Literal:
        return value in args, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        item_type = args[0] if args else Any
        out = []
        for item in value:
            ok, coerced = _type_ok(item, item_type)
            if not ok:
                return False, value
            out.append(coerced)
        return True, (tuple(out) if origin is tuple else out)
    if origin is dict:
        return isinstance(value, dict), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation)), value
    return True, value


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by name.

    Nested dataclass fields are built recursively; `where` prefixes key names in errors
    (e.g. "train.lr").
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{name}' (known keys: {known})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            kwargs[key] = dataclass_from_dict(annotation, value, name)
            continue
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            raise ConfigError(
                f"config key '{name}' has {type(value).__name__} value {value!r}, expected {_type_name(annotation)}"
            )
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if where and not str(e).startswith(where):
            raise ConfigError(f"{where}: {e}") from None
        raise


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with errors that name the file (and line): unreadable,
    not UTF-8, a syntax error, a duplicate key, an empty file, or a top level that is not a mapping.
    YAML floats follow YAML 1.2 (`lr: 1e-3` is a float, as on the command line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
                          f"{e.start}); save it as UTF-8") from None
    if not text.strip() or (path.suffix != ".json" and all(
            not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())):
        raise ConfigError(f"config file {path} is empty; expected a mapping (e.g. sections model, data, train)")
    try:
        data = _parse_json(text) if path.suffix == ".json" else _parse_yaml(text)
    except _ParseError as e:
        raise ConfigError(f"config file {path} line {e.line}: {e.message}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


class _ParseError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def _parse_json(text: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _ParseError(0, f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise _ParseError(e.lineno, f"invalid JSON at column {e.colno}: {e.msg}") from None
    except _ParseError as e:  # json gives no position for a duplicate: find the key's second occurrence
        key = e.message.split(" ", 2)[2]
        lines = [i for i, line in enumerate(text.splitlines(), 1) if f'"{key[1:-1]}"' in line]
        raise _ParseError(lines[1] if len(lines) > 1 else 1, e.message) from None


def _yaml_loader():
    """A SafeLoader that reads YAML 1.2 floats (`1e-3`, which YAML 1.1 leaves a string) and refuses
    duplicate keys (which YAML silently resolves to the last)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            # an alias (`*name`) may repeat a node exponentially often (a 1 KB "billion laughs" file
            # expands to gigabytes): a run config has no use for one, so it is refused where it appears
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise _ParseError(mark.line + 1, f"YAML alias '*{self.peek_event().anchor}' at column "
                                  f"{mark.column + 1}: aliases are not accepted in polyglu configs; write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _ParseError(line, f"duplicate key {key!r} (first at line {seen[key]})")
                seen[key] = line
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
                   r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
        list("-+0123456789."))
    return Loader


def _parse_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        where = f" at column {mark.column + 1}" if mark is not None else ""
        context = ""
        if e.context and e.context_mark is not None and e.problem:
            context = f" ({e.context} started at line {e.context_mark.line + 1})"
        raise _ParseError(line, f"YAML syntax error{where}: {e.problem or e.context}{context}") from None
    except yaml.YAMLError as e:
        raise _ParseError(1, f"YAML error: {str(e).splitlines()[0]}") from None


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# model config


@dataclass
class ModelConfig:
    """Architecture of a PolychromaticLM. Sizes are validated on construction."""

    vocab_size: int = 151_669
    d_model: int = 1024
    d_ff: int = 4096
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 64
    max_seq_len: int = 4096
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # feed-forward kind: "polyglu" (routed mix of `activations`) or a fixed-activation GLU baseline
    ffn: str = "polyglu"
    activations: tuple[str, ...] = DEFAULT_ACTIVATIONS
    gate_hidden: int = 32
    # how the routing network summarises the context: "causal" (default), "sequence" (original,
    # non-causal), "token" (no pooling); see docs/architecture.md
    routing_pool: str = "causal"
    # deterministic routing outside training: "soft" softmax(logits/tau) or "hard" one-hot argmax
    eval_routing: str = "soft"
    # Gumbel noise on routing logits while training (the paper's default)
    routing_noise: bool = True
    # temperature tau at construction; training schedules overwrite the saved buffer
    tau: float = 1.0
    # mixed-activation implementation: "auto" (fused when available), "fused", "reference"
    mixed_impl: str = "auto"
    # "full" routing (alpha + beta * gate_net); ablations: "static" (alpha only), "dynamic" (alpha = 0)
    routing_mode: str = "full"
    # dynamic logits shared by the layer's neurons ("layer", the paper) or per neuron ("neuron":
    # gate_net outputs routing_rank values, a (d_ff, K, routing_rank) map turns them into (d_ff, K))
    routing_scope: str = "layer"
    routing_rank: int = 4
    # attention on packed documents (doc_ids): "sdpa" with a dense (T x T) mask, "flex"
    # (FlexAttention with a document-causal BlockMask, PyTorch >= 2.5), or "auto": flex for packed
    # training on CUDA (uncached, autograd on), sdpa elsewhere; without doc_ids all use SDPA's
    # is_causal (flash on GPU)
    attention_backend: str = "auto"
    init_std: float = 0.02
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.activations, list):
            self.activations = tuple(self.activations)
        for name in ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "max_seq_len", "gate_hidden", "routing_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "tau", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        _check_choice("ffn", self.ffn, FFN_KINDS)
        _check_choice("routing_pool", self.routing_pool, ROUTING_POOLS)
        _check_choice("eval_routing", self.eval_routing, EVAL_ROUTING)
        _check_choice("mixed_impl", self.mixed_impl, MIXED_IMPLS)
        _check_choice("routing_mode", self.routing_mode, ROUTING_MODES)
        _check_choice("routing_scope", self.routing_scope, ROUTING_SCOPES)
        if self.routing_scope == "neuron" and self.routing_mode == "static":
            raise ConfigError("ModelConfig.routing_scope='neuron' needs dynamic routing; routing_mode='static' has "
                              "none (use routing_scope='layer')")
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.attention_backend == "flex":
            _require_flex_attention()
        if not self.activations:
            raise ConfigError("ModelConfig.activations must name at least one activation")
        for act in self.activations:
            if act not in ACTIVATION_NAMES:
                raise ConfigError(
                    f"ModelConfig.activations: unknown activation {act!r} (known: {', '.join(ACTIVATION_NAMES)})"
                )
        if len(set(self.activations)) != len(self.activations):
            raise ConfigError(f"ModelConfig.activations has duplicates: {list(self.activations)}")
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ConfigError(f"ModelConfig.{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # ---- construction helpers

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see `MODEL_PRESETS`), with keyword overrides validated like any key."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(MODEL_PRESETS)})")
        return cls.from_dict({**MODEL_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> ModelConfig:
        return dataclass_from_dict(cls, data, where)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        data = load_mapping(path)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **changes})

    # ---- derived sizes

    @property
    def n_activations(self) -> int:
        return len(self.activations)

    @property
    def ffn_activations(self) -> tuple[str, ...]:
        """The activations the FFN mixes: the routed set for PolyGLU, one fixed one for a baseline."""
        return self.activations if self.ffn == "polyglu" else (BASELINE_ACTIVATION[self.ffn],)

    @property
    def causal_routing(self) -> bool:
        """Whether every feed-forward reads only positions <= t (a KV cache decodes the model exactly)."""
        return routing_is_causal(self.routing_pool, n_activations=len(self.ffn_activations),
                                 routing_mode=self.routing_mode)


def _require_flex_attention() -> None:
    import torch  # only for this check: config stays importable without touching torch otherwise

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 5):
        raise ConfigError(f"ModelConfig.attention_backend='flex' needs PyTorch >= 2.5 "
                          f"(torch.nn.attention.flex_attention); this is torch {torch.__version__}. "
                          f"Use attention_backend='sdpa' or upgrade torch")


BASELINE_ACTIVATION = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "tanhglu": "tanh"}


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"ModelConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # trains in seconds on a CPU; byte-level vocabulary
    "debug": dict(vocab_size=512, d_model=64, d_ff=192, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  max_seq_len=256, gate_hidden=16),
    # the built-in demo: a few minutes on two CPU cores
    "demo": dict(vocab_size=1024, d_model=192, d_ff=512, n_layers=4, n_heads=6, n_kv_heads=3, head_dim=32,
                 max_seq_len=512, gate_hidden=32),
    # ~25M non-embedding-heavy model for benchmarks and quick GPU runs
    "small": dict(vocab_size=32_000, d_model=512, d_ff=1536, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64,
                  max_seq_len=2048),
    # the paper's PolychromaticLM: 597,153,888 parameters
    "paper-600m": dict(vocab_size=151_669, d_model=1024, d_ff=4096, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=64, max_seq_len=4096, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True),
}


# --------------------------------------------------------------------------------------------
# training configs: one file with sections `model`, `data`, `train` (+ `run_dir`, `init_from`)


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
    packing: bool = True
    # tokenise only the first N training conversations (a short fine-tuning run reads a few thousand of
    # a large file; tokenising all of them first costs more than the run); None: all
    sft_max_examples: int | None = None

    def __post_init__(self) -> None:
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
    # affinity less the machine's load (polyglu.hardware.choose_threads)
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
        self.model_config()  # validate now, with the key names

    def model_config(self) -> ModelConfig:
        fields = dict(self.model)
        preset = fields.pop("preset", None)
        try:
            if preset is not None:
                return ModelConfig.from_preset(preset, **fields)
            return ModelConfig.from_dict(fields, where="model")
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if (msg.startswith("model") or "'model." in msg) else f"model: {msg}") from None

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None, **defaults: Any) -> RunConfig:
        """Read a YAML/JSON run config and apply dotted `key=value` overrides (values parsed as YAML)."""
        return load_config(cls, path, overrides, **defaults)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def load_config(cls: type, path: str | Path | None, overrides: list[str] | None = None, **defaults: Any) -> Any:
    """Dataclass `cls` from a YAML/JSON file (or nothing), `defaults` for missing top-level keys, then
    dotted `key=value` overrides; errors name the file and the key."""
    data = load_mapping(path) if path is not None else {}
    for key, value in defaults.items():
        data.setdefault(key, value)
    overrides = list(overrides or [])
    if overrides:  # the file alone first: an error the command line introduced is blamed on it
        try:
            dataclass_from_dict(cls, copy.deepcopy(data))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    for item in overrides:
        # an override inside a mapping-valued section the file does not have (`model.d_model=128`
        # with no `model:`) refines that section's default ({"preset": "debug"}), not an empty one
        top = item.split("=", 1)[0].strip().split(".")[0]
        if "." in item.split("=", 1)[0] and top not in data:
            default = _mapping_default(cls, top)
            if default is not None:
                data[top] = default
        set_dotted(data, item)
    try:
        return dataclass_from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{_command_line_culprit(str(e), overrides)}: {e}") from None


def _command_line_culprit(message: str, overrides: list[str]) -> str:
    """'command-line override KEY=VALUE' for the override whose key the error names, else all of them."""
    import re

    keys = [item.split("=", 1)[0].strip() for item in overrides]
    named = [item for item, key in zip(overrides, keys) if f"'{key}'" in message]  # as the key errors quote it
    if not named:  # a value error names the field: 'ModelConfig.n_heads (3) must be ...'
        named = [item for item, key in zip(overrides, keys)
                 if re.search(rf"\b{re.escape(key.split('.')[-1])}\b", message.split(" (known keys:")[0])]
    chosen = named or overrides
    return f"command-line override{'s' if len(chosen) > 1 else ''} {' '.join(chosen)}"


def _mapping_default(cls: type, name: str) -> dict[str, Any] | None:
    """A fresh copy of dataclass field `name`'s default when that default is a mapping, else None."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            return value if isinstance(value, dict) else None
    return None


def bundled_configs_dir() -> Path:
    """The repository's configs/ (demo, ablation and size presets as YAML) next to src/ in an
    editable install; the package ships no second copy."""
    return Path(__file__).resolve().parents[2] / "configs"


def set_dotted(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict; the value is parsed as YAML."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=20)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_yaml_loader()) if raw != "" else None
    except (yaml.YAMLError, _ParseError):
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
    node[parts[-1]] = value
