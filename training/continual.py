"""Multi-task continual learning pieces: the per-round task order and the L2-SP penalty."""

from __future__ import annotations

import torch
from torch import nn


def task_order(num_tasks: int, round_index: int, seed: int, reshuffle: bool) -> list[int]:
    """Task indices visited in round `round_index` (0-based).

    With `reshuffle`: `torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed + round_index))`.
    Without: the configured order `0..num_tasks-1` every round.
    """
    if not reshuffle:
        return list(range(num_tasks))
    generator = torch.Generator().manual_seed(seed + round_index)
    return torch.randperm(num_tasks, generator=generator).tolist()


def l2sp_penalty(
    backbone: list[nn.Parameter], anchors: list[torch.Tensor], head: list[nn.Parameter], alpha: float, beta: float
) -> torch.Tensor:
    """alpha/2 * ||w - w0||^2 over the backbone (w0 = `anchors`) + beta/2 * ||head||^2 (Li et al., ICML 2018)."""
    drift = torch.stack([((p - a) ** 2).sum() for p, a in zip(backbone, anchors)]).sum()
    decay = torch.stack([(p**2).sum() for p in head]).sum() if head else drift.new_zeros(())
    return 0.5 * alpha * drift + 0.5 * beta * decay
