from polyglu.model.activations import ACTIVATIONS
from polyglu.model.polyglu import (
           GLU,
           PolyGLU,
           SwiGLU,
           mixed_activation_reference,
           routing_weights,
)
from polyglu.model.transformer import ModelOutput, PolychromaticLM

__all__ = ["ACTIVATIONS", "GLU", "ModelOutput", "PolyGLU", "PolychromaticLM", "SwiGLU",
           "mixed_activation_reference", "routing_weights"]
