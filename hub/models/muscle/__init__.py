"""MUSCLE: multi-dataset MoCo then multi-task continual learning on X-rays (ResNet-18/50)."""

from hub.models.family import Family

from . import variants
from .configuration_muscle import MuscleConfig
from .modeling_muscle import (
    MuscleBackbone,
    MuscleForImageClassification,
    MuscleForObjectDetection,
    MuscleForSemanticSegmentation,
    MuscleModel,
    MusclePreTrainedModel,
)

FAMILY = Family.declare(
    MuscleConfig,
    {
        "AutoModel": MuscleModel,
        "AutoModelForImageClassification": MuscleForImageClassification,
        "AutoModelForSemanticSegmentation": MuscleForSemanticSegmentation,
        "AutoModelForObjectDetection": MuscleForObjectDetection,
        "AutoBackbone": MuscleBackbone,
    },
    variants,
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
