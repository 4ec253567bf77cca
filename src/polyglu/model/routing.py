"""What a PolyGLU layer's routing is, read off the layer: its static routing softmax(alpha / tau) and
the entropy of routing weights.

The model layer owns these so that everything above it (analysis, training metrics, the Qwen3
converter) calls one function each. Static routing goes through the layer's own `routing_weights`,
so it cannot drift from what the forward applies.
"""

from __future__ import annotations

import torch

from polyglu.model.polyglu import PolyGLU, max_routing_entropy, routing_weights, weights_from_logits

__all__ = ["routing_entropy", "static_routing", "weights_from_logits"]


def static_routing(layer: PolyGLU) -> torch.Tensor:
    """softmax(alpha / tau) per neuron: (d_ff, K) float32, the routing with no dynamic part and no noise."""
    zeros = torch.zeros(1, 1, layer.n_activations, device=layer.alpha.device)
    with torch.no_grad():
        return routing_weights(layer.alpha.detach(), zeros, None, layer.tau)[0, 0]


def routing_entropy(probs: torch.Tensor, dim: int = -1, normalized: bool = False) -> torch.Tensor:
    """Shannon entropy -sum p log p over `dim` (0 log 0 = 0), in nats: the project's one entropy function.

    `normalized=True` divides by ln K (K = probs.shape[dim]), giving a fraction of the maximum in
    [0, 1]; with K = 1 the entropy is 0 and so is the fraction.
    """
    entropy = -torch.special.xlogy(probs, probs).sum(dim)
    if normalized:
        k = probs.shape[dim]
        return entropy / max_routing_entropy(k) if k > 1 else torch.zeros_like(entropy)
    return entropy
