"""Process-group setup and the collective operations the engine and recipes use.

Under `torchrun` (WORLD_SIZE > 1) the group uses NCCL on GPUs and gloo on CPU. Gradients are averaged with
one all-reduce per step over a flat bucket (the arithmetic of DistributedDataParallel's averaging), which
also covers stages that train a different subset of parameters at each step (task heads) without DDP's
unused-parameter search.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when launched by torchrun, else a single CPU/GPU process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return DistInfo(0, 1, torch.device("cuda" if cuda else "cpu"), None)
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), device, backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Mean of every parameter's gradient over all ranks (parameters without a gradient are skipped alike on
    every rank, because every rank trains the same parameters at the same step)."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics, queues) to every rank, as DDP does before a forward."""
    if not active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, 0)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order (no gradient)."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(value: object) -> list[object]:
    if not active():
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
