"""Momentum contrast (MoCo) pieces: 2-layer MLP projector, exact-EMA key encoder, negatives queue with
wrap-around, InfoNCE, and MoCo's shuffled BatchNorm across ranks."""

from __future__ import annotations

import copy

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from . import distributed


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's head: Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@torch.no_grad()
def ema_update(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, elementwise and in that rounding order."""
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, torch._foreach_mul(sources, 1.0 - momentum))


@torch.no_grad()
def enqueue(queue: torch.Tensor, pointer: torch.Tensor, keys: torch.Tensor) -> None:
    """Write `keys` (N, dim) into `queue` (dim, K) as if one at a time from column `pointer` on, wrapping around
    at K: key j lands in column (pointer + j) % K, so when N > K only the newest K keys remain. `pointer` (a 0-d
    long tensor) moves to (pointer + N) % K, the oldest key's column."""
    size, count, start = queue.shape[1], keys.shape[0], int(pointer)
    offsets = torch.arange(count, device=queue.device)
    if count > size:
        keys, offsets = keys[-size:], offsets[-size:]
    queue[:, (start + offsets) % size] = keys.T.to(queue.dtype)
    pointer.fill_((start + count) % size)


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the positive key among [key, queue] with cosine logits / temperature (inputs normalised)."""
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue.to(query.dtype)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits.float(), torch.zeros(len(query), dtype=torch.long, device=query.device))


class Moco(nn.Module):
    """Query encoder + projector trained by gradient; key encoder + projector as their exact EMA; the queue.

    `encoder` is any module returning `pooler_output`; it is used by reference (it is the backbone the recipe
    keeps training and exports).
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        queue_size: int,
        momentum: float,
        temperature: float,
    ):
        super().__init__()
        self.encoder_q = encoder
        self.projector_q = projector(in_dim, hidden_dim, out_dim)
        self.encoder_k = copy.deepcopy(encoder)
        self.projector_k = copy.deepcopy(self.projector_q)
        for parameter in self.key_parameters():
            parameter.requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        self.register_buffer("queue", F.normalize(torch.randn(out_dim, queue_size), dim=0))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def query_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder_q.parameters()) + list(self.projector_q.parameters())

    def key_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder_k.parameters()) + list(self.projector_k.parameters())

    def query(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector_q(self.encoder_q(pixel_values).pooler_output), dim=1)

    @torch.no_grad()
    def _key(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector_k(self.encoder_k(pixel_values).pooler_output), dim=1)

    @torch.no_grad()
    def keys(self, pixel_values: torch.Tensor, shuffle_bn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's keys, every rank's keys in rank order). Across ranks with `shuffle_bn`, the key encoder
        sees a batch permuted across ranks (rank 0 draws the permutation), so BatchNorm statistics cannot leak
        which samples are positives; keys are unshuffled afterwards."""
        if not distributed.active() or not shuffle_bn:
            local = self._key(pixel_values)
            return local, distributed.all_gather_cat(local)
        rank, batch = dist.get_rank(), pixel_values.shape[0]
        everything = distributed.all_gather_cat(pixel_values)
        permutation = torch.randperm(len(everything)).to(everything.device)
        dist.broadcast(permutation, 0)
        mine = slice(rank * batch, (rank + 1) * batch)
        shuffled_keys = distributed.all_gather_cat(self._key(everything[permutation[mine]]))
        keys = torch.empty_like(shuffled_keys)
        keys[permutation] = shuffled_keys
        return keys[mine], keys

    def loss(
        self, view_q: torch.Tensor, view_k: torch.Tensor, shuffle_bn: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of this rank's queries; returns (loss, all ranks' keys to enqueue after the step)."""
        query = self.query(view_q)
        key, gathered = self.keys(view_k, shuffle_bn)
        return info_nce(query, key, self.queue.clone().detach(), self.temperature), gathered

    @torch.no_grad()
    def momentum_update(self) -> None:
        ema_update(self.key_parameters(), self.query_parameters(), self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        enqueue(self.queue, self.queue_pointer, keys)
