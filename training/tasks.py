"""Labelled tasks of the multi-task recipes (MUSCLE, UMedPT): their settings, datasets, heads on one shared
encoder, per-task batches and the exported repos (the encoder's and one per task head)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from hub.export import Provenance, export_variant
from hub.models import Family
from hub.models.variant import Variant
from hub.processing.processor import MedicalImageProcessor

from .config import AugmentSettings
from .data import IndexStream, ManifestDataset, Target, augment, collate, read_split, sample_generator
from .errors import TrainingConfigError
from .heads import head_class, label_config, share_encoder


@dataclass
class TaskSettings:
    """One labelled task: `kind` (classification, segmentation, detection), class names (segmentation: index =
    mask value; detection: the box classes), the manifest `labels` key (classification), an optional manifest
    (default: the first `--data`) and head config overrides."""

    name: str
    kind: str
    class_names: list[str]
    label: str | None = None
    manifest: str | None = None
    head: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    settings: TaskSettings
    model: nn.Module
    dataset: ManifestDataset


def task_head_classes(family: Family, tasks: list[TaskSettings]) -> list[type[PreTrainedModel]]:
    """The family's model class of every task, after checking that the names are unique and that every
    classification task names its manifest `labels` key."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TrainingConfigError(f"task names must be unique, got {names}")
    classes = [head_class(family, t.kind, t.name) for t in tasks]
    for task in tasks:
        if task.kind == "classification" and not task.label:
            raise TrainingConfigError(f"task {task.name!r}: classification needs `label` (a manifest labels key)")
    return classes


def task_datasets(
    tasks: list[TaskSettings], default_manifest: Path, modality: str, processor: MedicalImageProcessor
) -> list[ManifestDataset]:
    """Every task's train split: its own manifest, or `default_manifest`."""
    return [
        ManifestDataset(
            read_split(Path(t.manifest) if t.manifest else default_manifest, "train", modality),
            processor,
            Target(t.kind, tuple(t.class_names), t.label),
        )
        for t in tasks
    ]


def build_tasks(
    variant: Variant,
    tasks: list[TaskSettings],
    head_classes: list[type[PreTrainedModel]],
    datasets: list[ManifestDataset],
    encoder: nn.Module,
) -> list[Task]:
    """One head model per task (the variant's config with the task's labels and head overrides), each using
    `encoder` by reference."""
    built = []
    for settings, cls, dataset in zip(tasks, head_classes, datasets):
        config = variant.build_config(**label_config(settings.class_names), **settings.head)
        built.append(Task(settings, share_encoder(cls(config), encoder), dataset))
    return built


def task_batches(
    dataset: ManifestDataset, stream: IndexStream, augment_settings: AugmentSettings, seed: int, task_index: int
) -> Callable[[int], dict[str, Any]]:
    """`batch(step)`: the collated, augmented samples of `stream`'s batch `step` (task `task_index`'s draws)."""

    def batch(step: int) -> dict[str, Any]:
        items = []
        for index, epoch in stream.batch(step):
            generator = sample_generator(seed, 1 + task_index, epoch, index)
            items.append(augment(dataset.sample(index), augment_settings, generator))
        return collate(items)

    return batch


def batch_to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, Any]:
    """`pixel_values` and `labels` on `device` (detection labels are a list of per-image target dicts)."""
    labels = batch["labels"]
    if isinstance(labels, list):
        labels = [{key: value.to(device) for key, value in target.items()} for target in labels]
    else:
        labels = labels.to(device)
    return batch["pixel_values"].to(device, non_blocking=True), labels


def export_task_repos(
    encoder: nn.Module, tasks: list[Task], out_dir: Path, variant: Variant, provenance: Provenance
) -> list[Path]:
    """The encoder's repo (`out_dir/encoder`) and one repo per task head (`out_dir/<task name>`)."""
    written = [export_variant(encoder, out_dir / "encoder", variant, provenance, overwrite=True)]
    for task in tasks:
        written.append(export_variant(task.model, out_dir / task.settings.name, variant, provenance, overwrite=True))
    return written
