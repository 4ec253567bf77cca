"""Process-group set-up and model wrapping (DDP or FSDP2), applied from outside the model.

Launched with `torchrun --nproc_per_node=N -m polyglu train ...`; a plain `polyglu train` is a
world of one and wraps nothing.

FSDP2 (`train.distributed=fsdp`): `fully_shard` on every transformer block, then on the root (the
trainer's LossModule), whose group holds the embedding, the final norm and the head: a tied
embedding/head is one parameter there, sharded once and still tied. Parameters become DTensors
sharded on dim 0; gradients are reduce-scattered (averaged over ranks, as DDP does) after every
micro-batch. Code that calls the inner model directly (validation, routing statistics) runs inside
`full_parameters`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | None = None) -> DistributedContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # "cuda": this process's GPU (torchrun's LOCAL_RANK)
            dev = torch.device("cuda", local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, local, dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module, strategy: str = "auto") -> nn.Module:
        if not self.enabled:
            return module
        if strategy == "fsdp":
            return self._fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _fully_shard(self, module: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard  # FSDP2, torch >= 2.6

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        model = module.model
        tied = model.lm_head.weight is model.embed_tokens.weight
        for block in model.layers:  # each block all-gathers just before its forward and frees after
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)  # the rest: embedding, final norm, head (the loss reads the head weight)
        if tied and model.lm_head.weight is not model.embed_tokens.weight:
            raise RuntimeError("fully_shard untied the embedding and the head")
        return module

    def is_sharded(self, module: nn.Module) -> bool:
        """True when `module` (or a submodule) is wrapped by FSDP2's fully_shard."""
        return bool(self._fsdp_modules(module))

    def _fsdp_modules(self, module: nn.Module) -> list[nn.Module]:
        if not self.enabled:  # a world of one wraps nothing (and needs no FSDP import)
            return []
        from torch.distributed.fsdp import FSDPModule

        return [m for m in module.modules() if isinstance(m, FSDPModule)]

    @contextlib.contextmanager
    def full_parameters(self, module: nn.Module):
        """Inside the block, every parameter of an FSDP2-wrapped `module` is gathered (plain
        tensors) and stays so across forwards, so its submodules can be called and read directly
        (validation, routing statistics). Costs the full model's memory while it lasts. A no-op
        for unwrapped or DDP-wrapped modules."""
        fsdp = self._fsdp_modules(module)
        if not fsdp:
            yield
            return
        if module in fsdp:
            # settle which module is the root (FSDP does it on the first forward) before a block
            # runs on its own, or that block would take the root's role (private API, torch 2.13)
            module._get_fsdp_state()._lazy_init()
        for m in fsdp:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in fsdp:
                if m is not module:  # as wrapped: blocks free their gathered weights after forward
                    m.set_reshard_after_forward(True, recurse=False)
                m.reshard()

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ that returns the global norm as a plain 0-dim tensor on the device (read it
        when it is needed: reading it is a host sync), also for sharded (DTensor) gradients, whose norm
        comes back as a DTensor."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor (FSDP2): reduce the partial norms
            norm = norm.full_tensor()
        return norm

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def no_sync(self, module: nn.Module, enabled: bool):
        """DDP: skip the all-reduce on all but the last micro-batch. FSDP2 modules have no `no_sync`:
        their gradients are reduce-scattered after every micro-batch, which keeps only sharded
        gradients in memory (the point of sharding) at the cost of one reduce-scatter per micro-batch."""
        if enabled and hasattr(module, "no_sync"):
            return module.no_sync()
        return contextlib.nullcontext()

    def all_reduce_sum(self, value):
        """The sum over ranks of a float (returned as a float) or of a tensor (returned as a tensor on
        the same device, no host read)."""
        if isinstance(value, torch.Tensor):
            if self.enabled:
                value = value.detach().clone()
                tdist.all_reduce(value)
            return value
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        tdist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()
