"""polyglu: PolyGLU feed-forward layers and the PolychromaticLM language model.

Public names are imported lazily (PEP 562), so `import polyglu` and `polyglu --help` do not pay
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PolyGLU": "polyglu.model.polyglu",
    "SwiGLU": "polyglu.model.polyglu",
    "GLU": "polyglu.model.polyglu",
    "PolychromaticLM": "polyglu.model.transformer",
    "ModelOutput": "polyglu.model.transformer",
    "KVCache": "polyglu.inference.cache",
    "ModelConfig": "polyglu.model_config",
    "ConfigError": "polyglu.config_loader",
    "load_model": "polyglu.loading",
    "CheckpointError": "polyglu.model_io",
    "generate": "polyglu.inference",
    "GenerationOutput": "polyglu.inference",
    "TextStreamer": "polyglu.inference",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'polyglu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover  # noqa: F401 (re-exports for type checkers)
    from polyglu.config_loader import ConfigError  # noqa: F401
    from polyglu.inference import GenerationOutput, TextStreamer, generate  # noqa: F401
    from polyglu.inference.cache import KVCache  # noqa: F401
    from polyglu.loading import load_model  # noqa: F401
    from polyglu.model.polyglu import GLU, PolyGLU, SwiGLU  # noqa: F401
    from polyglu.model.transformer import ModelOutput, PolychromaticLM  # noqa: F401
    from polyglu.model_config import ModelConfig  # noqa: F401
    from polyglu.model_io import CheckpointError  # noqa: F401
