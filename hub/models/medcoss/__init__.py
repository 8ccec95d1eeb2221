"""MedCoSS: one ViT-B shared by report text, X-ray, CT, MRI and pathology, pretrained modality by modality."""

from hub.models.family import Family

from . import variants
from .configuration_medcoss import MedCossConfig
from .modeling_medcoss import (
    MedCossForImageClassification,
    MedCossForPreTraining,
    MedCossForSemanticSegmentation,
    MedCossModel,
    MedCossPreTrainedModel,
)

FAMILY = Family.declare(
    MedCossConfig,
    {
        "AutoModel": MedCossModel,
        "AutoModelForImageClassification": MedCossForImageClassification,
        "AutoModelForSemanticSegmentation": MedCossForSemanticSegmentation,
        "AutoModelForPreTraining": MedCossForPreTraining,
    },
    variants,
)

__all__ = [
    "FAMILY",
    "MedCossConfig",
    "MedCossForImageClassification",
    "MedCossForPreTraining",
    "MedCossForSemanticSegmentation",
    "MedCossModel",
    "MedCossPreTrainedModel",
]
