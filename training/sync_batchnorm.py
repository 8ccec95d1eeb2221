"""Synchronised BatchNorm on any process-group backend, and the conversion the engine applies under torchrun.

torch's `nn.SyncBatchNorm` refuses CPU tensors (under torchrun with gloo each rank would normalise with its own half
of the batch) and cannot be switched off for one stage (MoCo's shuffled BatchNorm needs per-rank statistics: global
ones would undo the shuffle). `AllReduceBatchNorm`, used on every backend, computes training-mode statistics over
every rank's samples with all-reduces that autograd differentiates (the backward of a sum over ranks sums the
gradients over ranks, the gradient of the global statistics): first the per-channel sums and the sample count, then
the centred sums of squares around the global mean (two passes, like single-process BatchNorm). R ranks of B/R
samples then normalise exactly as one process with B samples does, up to float rounding. Ranks may hold different
numbers of samples (even none: the counts are all-reduced); note that the engine averages per-rank gradients, so a
run equals one process only when the per-rank losses are means over equal batches.

`synchronised = False` (set per stage by the engine through `set_synchronised`) makes it per-rank BatchNorm.
Running statistics (momentum or cumulative average, unbiased variance with the global count,
`num_batches_tracked`), eval mode and state_dict keys are those of `nn.BatchNorm*d`.
"""

from __future__ import annotations

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from . import distributed


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's copy of the sum flows back summed to every input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, *) inputs whose training statistics cover all ranks (a single process: its own
    batch, by the same arithmetic). Eval mode is `F.batch_norm` with the running statistics, as nn.BatchNorm."""

    synchronised = True

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input of at least 2 dimensions, got {input.dim()}")

    def _average_factor(self) -> float:
        """Count this batch and return the running statistics' update factor (as `_BatchNorm.forward`)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            batch_stats = self.running_mean is None and self.running_var is None
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, 0.0, self.eps
            )
        count = torch.tensor([input.numel() // max(input.shape[1], 1)], dtype=torch.int64, device=input.device)
        sync = self.synchronised and distributed.active()
        if sync:
            dist.all_reduce(count)
        count = int(count)
        if count <= 1:
            where = "over all ranks" if sync else "on this rank"
            raise ValueError(
                f"BatchNorm needs more than 1 value per channel in training, got {count} {where} "
                f"(input shape {tuple(input.shape)} on this rank)"
            )
        factor = self._average_factor()
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        total = _AllReduceSum.apply if sync else (lambda tensor: tensor)
        mean = total(values.sum(dims)) / count
        centred = values - mean.view(shape)
        squares = total(centred.square().sum(dims))
        out = centred * torch.rsqrt(squares / count + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = squares / (count - 1)
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def _synchronised(layer: nn.modules.batchnorm._BatchNorm) -> AllReduceBatchNorm:
    """`layer` as an `AllReduceBatchNorm`, holding the same parameter and buffer objects (so optimisers and
    references still apply)."""
    out = AllReduceBatchNorm(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
    )
    for name in ("weight", "bias"):
        setattr(out, name, getattr(layer, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        out._buffers[name] = layer._buffers.get(name)
    out.train(layer.training)
    return out


def convert_sync_batchnorm(network: nn.Module) -> None:
    """Replace every BatchNorm layer of `network` in place by an `AllReduceBatchNorm`. A layer shared by several
    parents stays one shared layer; parameters, buffers and state_dict keys are unchanged."""
    converted: dict[int, nn.Module] = {}
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            synchronised = isinstance(child, (nn.SyncBatchNorm, AllReduceBatchNorm))
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not synchronised:
                if id(child) not in converted:
                    converted[id(child)] = _synchronised(child)
                setattr(module, name, converted[id(child)])


def set_synchronised(network: nn.Module, synchronised: bool) -> None:
    """Switch every converted BatchNorm layer of `network` between all-rank and per-rank statistics."""
    for module in network.modules():
        if isinstance(module, AllReduceBatchNorm):
            module.synchronised = synchronised
