"""Pretraining recipes by name: each has a settings dataclass, a YAML file of presets and a builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.distributed import DistInfo
from training.engine import Recipe
from training.errors import TrainingConfigError

from . import macl, medcoss, muscle, umedpt


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    help: str
    settings_class: type
    build: Callable[[Any, list[Path], DistInfo], Recipe]


RECIPES: dict[str, RecipeEntry] = {
    entry.name: entry
    for entry in (
        RecipeEntry(
            "muscle",
            "MUSCLE: multi-dataset MoCo, then multi-task continual learning (L2-SP, reshuffled rounds)",
            muscle.MuscleSettings,
            muscle.MuscleRecipe,
        ),
        RecipeEntry(
            "macl",
            "MACL: asymmetric global/dense slice-position contrastive U-Net pretraining on CT/MRI slices",
            macl.MaclSettings,
            macl.MaclRecipe,
        ),
        RecipeEntry(
            "medcoss",
            "MedCoSS: modality-by-modality MAE/MLM with k-means rehearsal, mixup and feature distillation",
            medcoss.MedCossSettings,
            medcoss.MedCossRecipe,
        ),
        RecipeEntry(
            "umedpt",
            "UMedPT: multi-task classification/segmentation/detection with encoder gradients accumulated over tasks",
            umedpt.UmedptSettings,
            umedpt.UmedptRecipe,
        ),
    )
}


def get_recipe(name: str) -> RecipeEntry:
    if name not in RECIPES:
        raise TrainingConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
