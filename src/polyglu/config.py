"""The public names of polyglu's settings, in one place (`from polyglu.config import ModelConfig`).

Each lives beside what it configures; this module only re-exports them and owns nothing:

- `polyglu.config_loader`: reading YAML/JSON files and `key=value` overrides (`ConfigError`,
  `load_config`, `load_mapping`, `dataclass_from_dict`, `set_dotted`, `bundled_configs_dir`);
- `polyglu.model_config`: the model's settings (`ModelConfig`, `MODEL_PRESETS`, the choices of its
  fields, `routing_is_causal`);
- `polyglu.train.config`: a run's settings (`RunConfig`, `DataConfig`, `TrainSection`).

None of them imports torch. Library modules import from the owners, not from here.
"""

from __future__ import annotations

from polyglu.config_loader import (
    ConfigError,
    bundled_configs_dir,
    dataclass_from_dict,
    load_config,
    load_mapping,
    set_dotted,
    to_jsonable,
)
from polyglu.model_config import (
    ACTIVATION_NAMES,
    ATTENTION_BACKENDS,
    BASELINE_ACTIVATION,
    CAUSAL_ROUTING_POOLS,
    DEFAULT_ACTIVATIONS,
    EVAL_ROUTING,
    FFN_KINDS,
    MIXED_IMPLS,
    MODEL_PRESETS,
    ROUTING_MODES,
    ROUTING_POOLS,
    ROUTING_SCOPES,
    ModelConfig,
    routing_is_causal,
)
from polyglu.train.config import DataConfig, RunConfig, TrainSection

__all__ = [
    "ACTIVATION_NAMES", "ATTENTION_BACKENDS", "BASELINE_ACTIVATION", "CAUSAL_ROUTING_POOLS", "DEFAULT_ACTIVATIONS",
    "EVAL_ROUTING", "FFN_KINDS", "MIXED_IMPLS", "MODEL_PRESETS", "ROUTING_MODES", "ROUTING_POOLS", "ROUTING_SCOPES",
    "ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TrainSection", "bundled_configs_dir",
    "dataclass_from_dict", "load_config", "load_mapping", "routing_is_causal", "set_dotted", "to_jsonable",
]
