"""The model's settings: `ModelConfig`, its presets and its validation (torch-free).

Every size of PolychromaticLM is a preset of one `ModelConfig`, checked once, on construction
(`__post_init__`); a model built from it never changes it. The config sits beside the `model`
package rather than inside it: `model_io` (the model-directory format, which `model` imports for
`from_pretrained`) reads config.json into a `ModelConfig`, so the config must sit below both; and
`polyglu.model`'s `__init__` imports torch, which the CLI must not pay for to read a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyglu.config_loader import ConfigError, dataclass_from_dict, load_mapping, to_jsonable

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


def routing_is_causal(routing_pool: str, *, n_activations: int = 2, routing_mode: str = "full") -> bool:
    """Whether a feed-forward's routing at position t reads only positions <= t, so that a KV cache
    decodes it exactly (the one answer to "is this pooling causal?").

    True for a pool in CAUSAL_ROUTING_POOLS, and whenever the pool is never read: one activation
    (the softmax over one is 1) or static routing (alpha only, no gate_net).
    """
    if routing_pool not in ROUTING_POOLS:
        raise ConfigError(f"routing_pool must be one of {ROUTING_POOLS}, got {routing_pool!r}")
    return routing_pool in CAUSAL_ROUTING_POOLS or n_activations == 1 or routing_mode == "static"


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
    def from_section(cls, section: dict[str, Any]) -> ModelConfig:
        """The config a run's `model:` section describes: ModelConfig fields over an optional `preset`
        (the one reading of that section: run configs, their resume check, ablation variants). Errors
        name the key under `model`."""
        fields = dict(section)
        preset = fields.pop("preset", None)
        try:
            if preset is not None:
                return cls.from_preset(preset, **fields)
            return cls.from_dict(fields, where="model")
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if (msg.startswith("model") or "'model." in msg) else f"model: {msg}") from None

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
    # the built-in demo: a few minutes on two CPU cores. 3 layers: with the demo's budget (450 + 580 steps)
    # 81.5-87.0% on 1-2-step problems over 3 runs where 4 layers reached 88.0-90.0% for 1.3x the time
    "demo": dict(vocab_size=1024, d_model=192, d_ff=512, n_layers=3, n_heads=6, n_kv_heads=3, head_dim=32,
                 max_seq_len=512, gate_hidden=32),
    # ~25M non-embedding-heavy model for benchmarks and quick GPU runs
    "small": dict(vocab_size=32_000, d_model=512, d_ff=1536, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64,
                  max_seq_len=2048),
    # the paper's PolychromaticLM: 597,153,888 parameters
    "paper-600m": dict(vocab_size=151_669, d_model=1024, d_ff=4096, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=64, max_seq_len=4096, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True),
}
