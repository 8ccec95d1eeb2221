"""The MUSCLE recipe: (1) multi-dataset MoCo on every image of the `--data` manifests of the variant's modality;
(2) multi-task continual learning: R rounds, each visiting every task once in a per-round order
(`training.continual.task_order`), heads kept across rounds, the L2-SP penalty toward the backbone weights at the
start of each task visit, one cosine schedule over the stage; (3) export of the encoder repo and one repo per
task head. MUSCLE-- (the paper's ablation) is `continual: {l2sp: false, reshuffle: false}` with one round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hub.export import Provenance
from hub.models import get_family
from training.config import AugmentSettings, EngineSettings, OptimSettings
from training.continual import l2sp_penalty, task_order
from training.data import IndexStream, ManifestDataset, StepLoader, augment, read_split, sample_generator
from training.distributed import DistInfo
from training.engine import ManifestRecipe, Stage
from training.errors import TrainingConfigError
from training.heads import head_parameters
from training.moco import Moco
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


# The recipe's values live in muscle.yaml only: a field it sets has no default here (tests/test_training_config.py).
@dataclass(kw_only=True)
class MocoSettings:
    steps: int
    queue_size: int
    momentum: float
    temperature: float
    projection_hidden: int | None
    projection_dim: int
    shuffle_bn: bool
    dataset_weights: list[float] | None
    optim: OptimSettings
    augment: AugmentSettings


@dataclass(kw_only=True)
class ContinualSettings:
    rounds: int
    steps_per_task: int
    reshuffle: bool
    l2sp: bool
    alpha: float
    beta: float
    optim: OptimSettings
    augment: AugmentSettings
    tasks: list[TaskSettings]


@dataclass(kw_only=True)
class MuscleSettings:
    variant: str
    seed: int
    engine: EngineSettings = field(default_factory=EngineSettings)
    moco: MocoSettings
    continual: ContinualSettings


class MocoStage(Stage):
    def __init__(
        self,
        moco: Moco,
        datasets: list[ManifestDataset],
        settings: MocoSettings,
        seed: int,
        dist: DistInfo,
        num_workers: int,
    ):
        self.name, self.num_steps, self.optim = "moco", settings.steps, settings.optim
        self.samples_per_step = settings.optim.batch_size * dist.world
        self.sync_bn = not settings.shuffle_bn  # shuffled BatchNorm is per-rank by design
        self.moco, self.datasets, self.settings, self.seed, self.device = moco, datasets, settings, seed, dist.device
        self.offsets = torch.tensor([0] + [len(d) for d in datasets]).cumsum(0).tolist()
        self.stream = IndexStream(
            [len(d) for d in datasets], settings.optim.batch_size, seed, dist.rank, dist.world, settings.dataset_weights
        )
        self.loader = StepLoader(self._batch, settings.steps, num_workers)
        self._keys: torch.Tensor | None = None

    def _item(self, index: int) -> dict[str, Any]:
        dataset = max(d for d in range(len(self.datasets)) if self.offsets[d] <= index)
        return self.datasets[dataset].sample(index - self.offsets[dataset])

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        views: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for index, epoch in self.stream.batch(step):
            item = self._item(index)
            for view in (0, 1):
                generator = sample_generator(self.seed, 0, epoch, index, view)
                views[view].append(augment(item, self.settings.augment, generator)["pixel_values"])
        return torch.stack(views[0]), torch.stack(views[1])

    def parameters(self) -> list[nn.Parameter]:
        return self.moco.query_parameters()

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.moco.train()
        view_q, view_k = (v.to(self.device, non_blocking=True) for v in self.loader.get(step))
        loss, self._keys = self.moco.loss(view_q, view_k, self.settings.shuffle_bn)
        return loss, {}

    def after_step(self, step: int) -> None:
        self.moco.momentum_update()
        self.moco.enqueue(self._keys)
        self._keys = None


class ContinualStage(Stage):
    """Step s belongs to visit s // steps_per_task; visit v is round v // T, position v % T of that round's order.
    A task's data position is (round * steps_per_task + step within the visit): every task reads its own stream."""

    def __init__(
        self,
        encoder: nn.Module,
        tasks: list[Task],
        settings: ContinualSettings,
        seed: int,
        dist: DistInfo,
        num_workers: int,
    ):
        self.name, self.optim = "continual", settings.optim
        self.num_steps = settings.rounds * len(tasks) * settings.steps_per_task
        self.samples_per_step = settings.optim.batch_size * dist.world
        self.encoder, self.tasks, self.settings, self.seed, self.device = encoder, tasks, settings, seed, dist.device
        self.streams = [
            IndexStream([len(t.dataset)], settings.optim.batch_size, seed + 1 + i, dist.rank, dist.world)
            for i, t in enumerate(tasks)
        ]
        per_task_steps = settings.rounds * settings.steps_per_task
        self.loaders = [
            StepLoader(task_batches(t.dataset, stream, settings.augment, seed, i), per_task_steps, num_workers)
            for i, (t, stream) in enumerate(zip(tasks, self.streams))
        ]
        self.anchors: list[torch.Tensor] | None = None

    def position(self, step: int) -> tuple[int, int, int]:
        """(task index, round, step within the visit) of stage step `step`."""
        visit, within = divmod(step, self.settings.steps_per_task)
        round_index, slot = divmod(visit, len(self.tasks))
        return task_order(len(self.tasks), round_index, self.seed, self.settings.reshuffle)[slot], round_index, within

    def parameters(self) -> list[nn.Parameter]:
        heads = [p for task in self.tasks for p in head_parameters(task.model)]
        return list(self.encoder.parameters()) + heads

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        index, round_index, within = self.position(step)
        task = self.tasks[index]
        if within == 0:
            self.anchors = [p.detach().clone() for p in self.encoder.parameters()]
        batch = self.loaders[index].get(round_index * self.settings.steps_per_task + within)
        pixel_values, labels = batch_to_device(batch, self.device)
        task.model.train()
        task_loss = task.model(pixel_values=pixel_values, labels=labels).loss
        metrics = {"task": index, "round": round_index, "task_loss": float(task_loss.detach())}
        if not self.settings.l2sp:
            return task_loss, metrics
        penalty = l2sp_penalty(
            list(self.encoder.parameters()),
            self.anchors,
            head_parameters(task.model),
            self.settings.alpha,
            self.settings.beta,
        )
        metrics["l2sp"] = float(penalty.detach())
        return task_loss + penalty, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchors = state.get("anchors")
        self.anchors = None if anchors is None else [a.to(self.device) for a in anchors]


class MuscleNetwork(nn.Module):
    """Everything the recipe checkpoints: MoCo (its query encoder is the backbone) and the task heads."""

    def __init__(self, moco: Moco, heads: dict[str, nn.Module]):
        super().__init__()
        self.moco = moco
        self.heads = nn.ModuleDict(heads)


class MuscleRecipe(ManifestRecipe):
    name = "muscle"

    def __init__(self, settings: MuscleSettings, manifests: list[Path], dist: DistInfo):
        super().__init__(settings, manifests, dist)
        self.family = get_family(self.variant.family)
        self.processor = self.variant.build_processor()
        continual = settings.continual
        if continual.rounds < 1 or continual.steps_per_task < 1 or not continual.tasks:
            raise TrainingConfigError("continual needs rounds >= 1, steps_per_task >= 1 and at least one task")
        head_classes = task_head_classes(self.family, continual.tasks)
        modality = self.variant.modality
        self.pretrain_sets = [ManifestDataset(read_split(m, "train", modality), self.processor) for m in self.manifests]
        task_sets = task_datasets(continual.tasks, self.manifests[0], modality, self.processor)
        config = self.variant.build_config()
        self.encoder = self.family.encoder_class(config)
        moco_settings = settings.moco
        hidden = moco_settings.projection_hidden or config.hidden_size
        moco = Moco(
            self.encoder,
            config.hidden_size,
            hidden,
            moco_settings.projection_dim,
            moco_settings.queue_size,
            moco_settings.momentum,
            moco_settings.temperature,
        )
        self.tasks = build_tasks(self.variant, continual.tasks, head_classes, task_sets, self.encoder)
        self.network = MuscleNetwork(moco, {t.settings.name: t.model for t in self.tasks})

    def stages(self) -> list[Stage]:
        workers = self.settings.engine.num_workers
        return [
            MocoStage(
                self.network.moco, self.pretrain_sets, self.settings.moco, self.settings.seed, self.dist, workers
            ),
            ContinualStage(self.encoder, self.tasks, self.settings.continual, self.settings.seed, self.dist, workers),
        ]

    def _provenance(self) -> Provenance:
        s = self.settings
        images = sum(len(d) for d in self.pretrain_sets)
        description = (
            f"trained with medhub's MUSCLE recipe: MoCo for {s.moco.steps} steps, then {s.continual.rounds} rounds "
            f"of continual learning over {len(self.tasks)} tasks ({s.continual.steps_per_task} steps per visit"
            f"{', L2-SP' if s.continual.l2sp else ''}{', reshuffled' if s.continual.reshuffle else ''})"
        )
        sources = ", ".join(m.name for m in self.manifests)
        data = f"{images} training images from {sources} (modality {self.variant.modality})"
        return self.trained_provenance(description, data)

    def export(self, out_dir: Path) -> list[Path]:
        with self.network_on_cpu():
            return export_task_repos(self.encoder, self.tasks, out_dir, self.variant, self._provenance())
