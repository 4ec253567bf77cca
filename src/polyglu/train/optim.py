"""Optimizer parameter groups: weight decay on matrix weights of projections and embeddings only."""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("alpha", "beta", "routing_map")  # routing_map: per-neuron, like alpha


def decays(name: str, param: torch.Tensor) -> bool:
    """True for matrix weights (projections, embeddings, routing MLP); never alpha, beta, a neuron-scope
    routing_map (its identity start is the layer scope, not zero), norms, biases."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim >= 2 and leaf not in NO_DECAY_NAMES


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if decays(name, p):
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    groups = parameter_groups(model, weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
