"""What an ablation compares: the variants (model fields over the base run config) and the
`ablation:` section of its config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyglu.config_loader import ConfigError, load_config, to_jsonable
from polyglu.train.config import RunConfig

# variant -> the model fields it sets on top of the base config
VARIANTS: dict[str, dict[str, Any]] = {
    "polyglu": {"ffn": "polyglu", "routing_mode": "full", "routing_noise": True},
    "polyglu-static": {"ffn": "polyglu", "routing_mode": "static", "routing_noise": True},
    "polyglu-dynamic": {"ffn": "polyglu", "routing_mode": "dynamic", "routing_noise": True},
    "polyglu-nonoise": {"ffn": "polyglu", "routing_mode": "full", "routing_noise": False},
    "polyglu-neuron": {"ffn": "polyglu", "routing_mode": "full", "routing_noise": True, "routing_scope": "neuron"},
    "swiglu": {"ffn": "swiglu"},
    "geglu": {"ffn": "geglu"},
    "reglu": {"ffn": "reglu"},
    "tanhglu": {"ffn": "tanhglu"},
}
VARIANT_DESCRIPTIONS = {
    "polyglu": "static α + dynamic β·gate_net, Gumbel noise",
    "polyglu-static": "α only (no gate_net)",
    "polyglu-dynamic": "β·gate_net only (α fixed at 0)",
    "polyglu-nonoise": "full routing, no Gumbel noise",
    "polyglu-neuron": "full routing, per-neuron dynamic logits (routing_scope neuron, rank routing_rank)",
    "swiglu": "SiLU gate",
    "geglu": "GELU gate",
    "reglu": "ReLU gate",
    "tanhglu": "tanh gate",
}


@dataclass
class AblationSection:
    """What to compare and how to score it; the `ablation:` section of an ablation config."""

    output_dir: str = "runs/ablation"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 3  # runs per variant, with train.seed = base seed + 0, 1, ...
    # shrink d_ff of the PolyGLU variants so their total parameters match the reference's
    matched_params: bool = False
    reference: str = "swiglu"  # the variant the others are compared with (and matched to)
    eval_problems: int = 200  # held-out math test problems per run; 0 skips the math evaluation
    eval_chat: bool = False  # False: plain "Question: ...\nAnswer:" prompts, the pre-training format
    eval_max_new_tokens: int = 96
    eval_batch_size: int = 100
    plot: bool = True

    def __post_init__(self) -> None:
        for name in [*self.variants, self.reference]:
            if name not in VARIANTS:
                raise ConfigError(f"ablation: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        if not self.variants:
            raise ConfigError("ablation.variants must name at least one variant")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"ablation.variants has duplicates: {self.variants}")
        if self.seeds < 1:
            raise ConfigError(f"ablation.seeds must be >= 1, got {self.seeds}")
        if self.eval_problems < 0:
            raise ConfigError(f"ablation.eval_problems must be >= 0, got {self.eval_problems}")
        for name in ("eval_max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ablation.{name} must be positive, got {getattr(self, name)}")


@dataclass
class AblationConfig:
    """`base`: the run config every variant starts from (model/data/train as in `polyglu train`);
    `ablation`: variants, seeds, parameter matching, evaluation."""

    base: RunConfig = field(default_factory=RunConfig)
    ablation: AblationSection = field(default_factory=AblationSection)

    def __post_init__(self) -> None:
        if self.base.task != "pretrain":
            raise ConfigError(f"base.task must be 'pretrain' for an ablation, got {self.base.task!r}")
        if self.base.init_from:
            raise ConfigError("base.init_from is not supported: every variant is trained from scratch")
        for key in ("ffn", "routing_mode", "routing_noise", "routing_scope"):
            if key in self.base.model:
                raise ConfigError(f"base.model.{key} is set by each variant; remove it from the base config")

    @classmethod
    def load(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> AblationConfig:
        """Read a YAML/JSON ablation config; `overrides` are dotted `key=value` items
        (e.g. `base.train.max_steps=50`, `ablation.seeds=1`)."""
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @property
    def output_dir(self) -> Path:
        return Path(self.ablation.output_dir)

    def seeds(self) -> list[int]:
        return [self.base.train.seed + i for i in range(self.ablation.seeds)]
