"""MedCoSS: one ViT-B shared by report text, X-ray, CT, MRI and pathology, pretrained modality by modality."""

from pathlib import Path

from hub.models.family import Family, square_image_inputs

from .configuration_medcoss import MedCossConfig
from .modeling_medcoss import (
    MedCossForImageClassification,
    MedCossForPreTraining,
    MedCossForSemanticSegmentation,
    MedCossModel,
    MedCossPreTrainedModel,
)
from .variants import PRESETS, VARIANTS, card_context

FAMILY = Family(
    model_type="medcoss",
    config_class=MedCossConfig,
    auto_classes={
        "AutoModel": MedCossModel,
        "AutoModelForImageClassification": MedCossForImageClassification,
        "AutoModelForSemanticSegmentation": MedCossForSemanticSegmentation,
        "AutoModelForPreTraining": MedCossForPreTraining,
    },
    source_dir=Path(__file__).parent,
    example_inputs=square_image_inputs,
    card_context=card_context,
    variants=VARIANTS,
    presets=PRESETS,
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
