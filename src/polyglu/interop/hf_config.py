"""`PolychromaticConfig`: a `transformers` config holding exactly the fields of `ModelConfig`.

config.json stays flat, as the Hugging Face tools expect, with our field names; the usual names
(`hidden_size`, `num_hidden_layers`, ...) are aliases through `attribute_map`. Values are validated
by `ModelConfig` on construction, so a bad key or size fails when the config is read, naming the
key. This module imports nothing from polyglu but `model_config`: `polyglu export-hf` bundles it
(with `ModelConfig` and the `config_loader` functions it uses) into a standalone
`configuration_polychromatic.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from polyglu.model_config import ModelConfig


class PolychromaticConfig(PretrainedConfig):
    model_type = "polychromatic"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the name from transformers 5.24, and before
    # standard transformers names -> ModelConfig fields
    attribute_map = {
        "hidden_size": "d_model",
        "intermediate_size": "d_ff",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "tie_word_embeddings": "tie_embeddings",
        "initializer_range": "init_std",
    }

    def __init__(self, **kwargs: Any) -> None:
        # aliases may arrive as keyword arguments too (e.g. tie_word_embeddings from transformers)
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                kwargs.setdefault(name, value)
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        model_config = ModelConfig.from_dict({k: kwargs.pop(k) for k in fields if k in kwargs})
        super().__init__(**kwargs)
        # after the base class, which may set defaults of its own for shared names (pad_token_id, ...)
        for key, value in model_config.to_dict().items():
            setattr(self, key, value)

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` these fields describe (validated)."""
        return ModelConfig.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})
