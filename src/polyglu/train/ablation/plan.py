"""The runs of an ablation: each variant x seed's model fields, matched d_ff, run directory and
full run config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from polyglu.config_loader import ConfigError, dataclass_from_dict
from polyglu.model_config import ModelConfig
from polyglu.train.ablation.config import VARIANTS, AblationConfig
from polyglu.train.config import RunConfig

RESULTS_NAME = "results.json"


def variant_model_fields(config: AblationConfig, variant: str, d_ff: int | None = None) -> dict[str, Any]:
    """The `model:` section of a variant's run config (preset name kept)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    fields = {**config.base.model, **VARIANTS[variant]}
    if d_ff is not None:
        fields["d_ff"] = d_ff
    return fields


def variant_model_config(config: AblationConfig, variant: str, d_ff: int | None = None) -> ModelConfig:
    return ModelConfig.from_section(variant_model_fields(config, variant, d_ff))


def parameter_total(model_config: ModelConfig) -> int:
    """Total parameters (tied weights once) of a model built on the meta device: no memory, no init."""
    import torch

    from polyglu.model.parameters import parameter_counts
    from polyglu.model.transformer import PolychromaticLM

    with torch.device("meta"):
        model = PolychromaticLM(model_config)
    return int(parameter_counts(model)["total"])


def matched_d_ff(model_config: ModelConfig, target_params: int) -> int:
    """The d_ff whose total parameter count is closest to `target_params` (ties: the larger d_ff).

    The count is linear in d_ff (projections and α grow with it, gate_net does not), so two counts
    give the line and the neighbours of its solution are checked exactly. The embedding enters
    both sides alike, so the answer does not depend on the vocabulary size.
    """
    d = model_config.d_ff
    at_d, below = parameter_total(model_config), parameter_total(model_config.replace(d_ff=max(1, d - 1)))
    slope = at_d - below if d > 1 else at_d
    guess = d - (at_d - target_params) / slope
    candidates = {max(1, math.floor(guess)), max(1, math.ceil(guess))}
    counts = {c: parameter_total(model_config.replace(d_ff=c)) for c in candidates}
    return min(counts, key=lambda c: (abs(counts[c] - target_params), -c))


def variant_d_ff(config: AblationConfig) -> dict[str, int | None]:
    """d_ff per variant: None (the base value) unless `matched_params`, where every PolyGLU variant
    gets the d_ff that matches the reference's total parameters."""
    out: dict[str, int | None] = {v: None for v in config.ablation.variants}
    if not config.ablation.matched_params:
        return out
    reference = config.ablation.reference
    if VARIANTS[reference]["ffn"] == "polyglu":
        raise ConfigError(f"ablation.matched_params needs a baseline reference, got {reference!r}")
    target = parameter_total(variant_model_config(config, reference))
    for variant in out:
        if VARIANTS[variant]["ffn"] == "polyglu":
            out[variant] = matched_d_ff(variant_model_config(config, variant), target)
    return out


def is_matched(config: AblationConfig, variant: str) -> bool:
    return config.ablation.matched_params and VARIANTS[variant]["ffn"] == "polyglu"


def run_dir_of(config: AblationConfig, variant: str, seed: int) -> Path:
    """output_dir/<variant>/seed-<s>; a parameter-matched PolyGLU variant is <variant>-matched, so
    matched and unmatched runs share one directory and its baselines."""
    name = f"{variant}-matched" if is_matched(config, variant) else variant
    return config.output_dir / name / f"seed-{seed}"


def variant_run_config(config: AblationConfig, variant: str, seed: int, d_ff: int | None = None) -> RunConfig:
    """The full run config of one variant × seed: the base with the variant's model fields, the
    seed, its run directory and the shared built-in data directory."""
    data = config.base.to_dict()
    data["model"] = variant_model_fields(config, variant, d_ff)
    data["run_dir"] = str(run_dir_of(config, variant, seed))
    data["train"]["seed"] = seed
    if not data["data"].get("builtin_dir"):
        data["data"]["builtin_dir"] = str(config.output_dir / "data")
    try:
        return dataclass_from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"variant {variant}: {e}") from None
