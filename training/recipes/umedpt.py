"""The UMedPT recipe (Schäfer et al., Nat. Comput. Sci. 2024): multi-task learning with gradient accumulation.

Every step visits the tasks round-robin (upstream's cyclic task sampler: each task reads the next batch of its
own sample stream, a shorter dataset simply starting its next epoch). For each task the forward and the backward
run at once, so only that task's graph is ever alive and memory does not grow with the number of tasks. The
task's head then steps its own optimiser (the stage's settings, lr x `lr_factor_tasks`, its own warm-up + cosine)
and drops its gradients, while the shared blocks' gradients accumulate (a sum over the tasks) until the engine's
optimiser steps them once per step (upstream's default accumulation, k = number of tasks). The shared blocks are
the encoder and, as upstream, the blocks that `shared_blocks` names per task kind: one pixel decoder for all
segmentation tasks, one FCOS pyramid and conv towers for all detection tasks; a head keeps only its last layers.

The engine back-propagates the loss a stage returns through its gradient scaler, so the stage returns the summed
task loss through `relay_gradients`, whose backward hands every shared parameter its accumulated gradient: the
engine's scaler, all-reduce, clipping, optimiser and schedule then act on exactly that sum.

Known difference from upstream: under torchrun the gradients are averaged over ranks like every recipe's (upstream
multiplies the averaged shared gradients by the world size, a sum).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hub.export import Provenance
from hub.models import get_family
from training import distributed
from training.config import AugmentSettings, EngineSettings, OptimSettings
from training.data import TASK_KINDS, IndexStream, StepLoader
from training.distributed import DistInfo
from training.engine import ManifestRecipe, Stage, make_optimizer, warmup_cosine
from training.errors import TrainingConfigError
from training.tasks import (
    Task,
    TaskSettings,
    batch_to_device,
    build_tasks,
    export_task_repos,
    task_batches,
    task_datasets,
    task_head_classes,
)


@dataclass(kw_only=True)
class UmedptSettings:
    """`optim` is the shared blocks' optimiser and every task's batch size; heads use it with lr x `lr_factor_tasks`.
    `shared_blocks`: per task kind, the modules (dotted paths) every task of that kind shares (empty: each head
    owns them). The recipe's values live in umedpt.yaml only: a field it sets has no default here."""

    variant: str
    seed: int
    steps: int
    lr_factor_tasks: float
    engine: EngineSettings
    optim: OptimSettings
    augment: AugmentSettings
    tasks: list[TaskSettings]
    shared_blocks: dict[str, list[str]]


class _Relay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, gradients: tuple[torch.Tensor, ...], *parameters: nn.Parameter):
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (None, None, *(gradient * grad_output for gradient in ctx.gradients))


def relay_gradients(value: torch.Tensor, parameters: list[nn.Parameter], scale: float = 1.0) -> torch.Tensor:
    """`value` as a differentiable output whose backward gives every parameter of `parameters` that has a gradient
    its current `.grad / scale` (times the incoming gradient); the gradients move into the relay (`.grad` = None)."""
    owners = [p for p in parameters if p.grad is not None]
    gradients = tuple(p.grad.div_(scale) for p in owners)
    for parameter in owners:
        parameter.grad = None
    return _Relay.apply(value.detach().float(), gradients, *owners)


def _shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in module.state_dict().items()}


def share_blocks(tasks: list[Task], blocks: dict[str, list[str]]) -> list[nn.Module]:
    """Make every task of a kind use the first such task's modules at the paths `blocks[kind]`; return the shared
    modules. A missing path or a block of another shape (a head config override) is an error naming the task."""
    unknown = sorted(set(blocks) - set(TASK_KINDS))
    if unknown:
        raise TrainingConfigError(f"shared_blocks: unknown task kind(s) {unknown}; expected some of {list(TASK_KINDS)}")
    first: dict[tuple[str, str], tuple[str, nn.Module]] = {}
    for task in tasks:
        name, kind = task.settings.name, task.settings.kind
        for path in blocks.get(kind, []):
            try:
                module = task.model.get_submodule(path)
            except AttributeError:
                raise TrainingConfigError(
                    f"task {name!r}: its {kind} model has no block {path!r} to share; fix shared_blocks.{kind}"
                ) from None
            owner, shared = first.setdefault((kind, path), (name, module))
            if shared is module:
                continue
            if _shapes(module) != _shapes(shared):
                raise TrainingConfigError(
                    f"task {name!r}: block {path!r} differs in shape from task {owner!r}'s, so "
                    f"they cannot share it; align their head settings or fix shared_blocks.{kind}"
                )
            parent, _, attribute = path.rpartition(".")
            setattr(task.model.get_submodule(parent), attribute, shared)
    return [module for _, module in first.values()]


class MultiTaskStage(Stage):
    """One step = every task once, in configuration order; step s of task t reads batch s of task t's stream."""

    def __init__(self, shared: list[nn.Module], tasks: list[Task], settings: UmedptSettings, dist: DistInfo):
        self.name, self.num_steps, self.optim = "multitask", settings.steps, settings.optim
        self.samples_per_step = settings.optim.batch_size * dist.world * len(tasks)
        self.tasks, self.settings, self.device = tasks, settings, dist.device
        self.shared = list({id(p): p for module in shared for p in module.parameters()}.values())
        batch_size, seed = settings.optim.batch_size, settings.seed
        self.streams = [
            IndexStream([len(t.dataset)], batch_size, seed + 1 + i, dist.rank, dist.world) for i, t in enumerate(tasks)
        ]
        self.loaders = [
            StepLoader(
                task_batches(t.dataset, stream, settings.augment, seed, i), settings.steps, settings.engine.num_workers
            )
            for i, (t, stream) in enumerate(zip(tasks, self.streams))
        ]
        shared_ids = {id(p) for p in self.shared}
        self.head_parameters = [[p for p in task.model.parameters() if id(p) not in shared_ids] for task in tasks]
        head_optim = replace(settings.optim, lr=settings.optim.lr * settings.lr_factor_tasks)
        self.head_optimizers = [make_optimizer(params, head_optim) for params in self.head_parameters]
        schedule = warmup_cosine(settings.steps, settings.optim.warmup_steps, settings.optim.min_lr_ratio)
        self.head_schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in self.head_optimizers]
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.engine.amp and dist.device.type == "cuda")

    def parameters(self) -> list[nn.Parameter]:
        """The shared blocks' parameters (the engine's optimiser); each head's own are in `head_parameters`."""
        return self.shared

    def task_loss(self, index: int, step: int) -> torch.Tensor:
        """Task `index`'s loss on its batch of `step` (forward only)."""
        task = self.tasks[index]
        pixel_values, labels = batch_to_device(self.loaders[index].get(step), self.device)
        task.model.train()
        return task.model(pixel_values=pixel_values, labels=labels).loss

    def _step_head(self, index: int) -> None:
        optimizer, parameters = self.head_optimizers[index], self.head_parameters[index]
        distributed.average_gradients(parameters)
        if self.settings.engine.grad_clip > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.settings.engine.grad_clip)
        self.scaler.step(optimizer)
        self.head_schedulers[index].step()
        optimizer.zero_grad(set_to_none=True)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        scale = self.scaler.get_scale()
        metrics: dict[str, float] = {}
        for index, task in enumerate(self.tasks):
            task_loss = self.task_loss(index, step)
            value = float(task_loss.detach())
            if not torch.isfinite(task_loss):
                raise FloatingPointError(
                    f"task {task.settings.name!r} step {step + 1}: loss is {value}; lower the learning rate"
                )
            self.scaler.scale(task_loss).backward()
            del task_loss  # the graph is gone after backward; drop the last reference before the next task
            self._step_head(index)
            metrics[f"loss_{task.settings.name}"] = value
        if self.scaler.is_enabled():
            finite = all(bool(torch.isfinite(p.grad).all()) for p in self.shared if p.grad is not None)
            self.scaler.update(None if finite else scale * self.scaler.get_backoff_factor())
        total = torch.tensor(sum(metrics.values()), device=self.device)
        return relay_gradients(total, self.shared, scale), metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "head_optimizers": [o.state_dict() for o in self.head_optimizers],
            "head_schedulers": [s.state_dict() for s in self.head_schedulers],
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for optimizer, saved in zip(self.head_optimizers, state["head_optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.head_schedulers, state["head_schedulers"]):
            scheduler.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])


class UmedptNetwork(nn.Module):
    """Everything the recipe checkpoints: the shared encoder and the task models that use it."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)


class UmedptRecipe(ManifestRecipe):
    name = "umedpt"

    def __init__(self, settings: UmedptSettings, manifests: list[Path], dist: DistInfo):
        super().__init__(settings, manifests, dist)
        if settings.steps < 1 or not settings.tasks:
            raise TrainingConfigError("the umedpt recipe needs steps >= 1 and at least one task")
        if settings.lr_factor_tasks <= 0:
            raise TrainingConfigError(f"lr_factor_tasks must be positive, got {settings.lr_factor_tasks}")
        self.family = get_family(self.variant.family)
        self.processor = self.variant.build_processor()
        head_classes = task_head_classes(self.family, settings.tasks)
        datasets = task_datasets(settings.tasks, self.manifests[0], self.variant.modality, self.processor)
        self.encoder = self.family.encoder_class(self.variant.build_config())
        self.tasks = build_tasks(self.variant, settings.tasks, head_classes, datasets, self.encoder)
        self.shared = [self.encoder, *share_blocks(self.tasks, settings.shared_blocks)]
        self.network = UmedptNetwork(self.encoder, {t.settings.name: t.model for t in self.tasks})

    def stages(self) -> list[Stage]:
        return [MultiTaskStage(self.shared, self.tasks, self.settings, self.dist)]

    def _provenance(self) -> Provenance:
        s = self.settings
        kinds = ", ".join(f"{t.settings.name} ({t.settings.kind})" for t in self.tasks)
        description = (
            f"trained with medhub's UMedPT recipe: {s.steps} multi-task steps over {len(self.tasks)} tasks ({kinds}), "
            f"each step one batch of every task, shared gradients accumulated over the tasks"
        )
        images = sum(len(t.dataset) for t in self.tasks)
        sources = ", ".join(m.name for m in self.manifests)
        data = f"{images} labelled training images (an image counted once per task using it) from {sources}"
        return self.trained_provenance(description, data)

    def export(self, out_dir: Path) -> list[Path]:
        with self.network_on_cpu():
            return export_task_repos(self.encoder, self.tasks, out_dir, self.variant, self._provenance())
