"""MUSCLE: multi-dataset MoCo then multi-task continual learning on X-rays (ResNet-18/50)."""

from pathlib import Path

from hub.models.family import Family, square_image_inputs

from .configuration_muscle import MuscleConfig
from .modeling_muscle import (
    MuscleBackbone,
    MuscleForImageClassification,
    MuscleForObjectDetection,
    MuscleForSemanticSegmentation,
    MuscleModel,
    MusclePreTrainedModel,
)
from .variants import PRESETS, VARIANTS, card_context

FAMILY = Family(
    model_type="muscle",
    config_class=MuscleConfig,
    auto_classes={
        "AutoModel": MuscleModel,
        "AutoModelForImageClassification": MuscleForImageClassification,
        "AutoModelForSemanticSegmentation": MuscleForSemanticSegmentation,
        "AutoModelForObjectDetection": MuscleForObjectDetection,
        "AutoBackbone": MuscleBackbone,
    },
    source_dir=Path(__file__).parent,
    example_inputs=square_image_inputs,
    card_context=card_context,
    variants=VARIANTS,
    presets=PRESETS,
)

__all__ = [
    "FAMILY",
    "MuscleBackbone",
    "MuscleConfig",
    "MuscleForImageClassification",
    "MuscleForObjectDetection",
    "MuscleForSemanticSegmentation",
    "MuscleModel",
    "MusclePreTrainedModel",
]
