"""Optimizer parameter groups: weight decay on matrix weights of projections and embeddings only."""

from __future__ import annotations

import functools

import torch
from torch import nn

from polyglu.train.config import TrainSection

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


@functools.cache
def fused_on(device_type: str) -> bool:
    """Whether torch's fused AdamW runs on `device_type`: CUDA, and the CPU from torch 2.4 on (asked of
    torch itself, by building one)."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, fused where torch has the kernel for the parameters' device
    (all on one): one kernel per tensor where the default on the CPU is a loop of ~10 ops per tensor
    (the demo's models, two threads: the step took 2.5 ms against 0.7 ms fused, and PolyGLU's
    routing tensors, many and small, cost the loop 30% more). The same update up to float rounding."""
    groups = parameter_groups(model, weight_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = len(devices) == 1 and fused_on(devices.pop())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def default_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """`build_optimizer` with the training config's defaults (lr, weight decay, betas, eps): the
    trainer's optimizer as the benchmarks time it."""
    defaults = TrainSection()
    return build_optimizer(model, defaults.lr, defaults.weight_decay, tuple(defaults.betas), defaults.eps)
