"""UMedPT: a Swin V2 encoder pre-trained on many biomedical tasks at once (classification, segmentation, detection)."""

from pathlib import Path

from hub.models.family import Family, square_image_inputs

from .configuration_umedpt import UmedptConfig
from .modeling_umedpt import (
    UmedptBackbone,
    UmedptForImageClassification,
    UmedptForObjectDetection,
    UmedptForSemanticSegmentation,
    UmedptModel,
    UmedptPreTrainedModel,
)
from .variants import PRESETS, VARIANTS, card_context

FAMILY = Family(
    model_type="umedpt",
    config_class=UmedptConfig,
    auto_classes={
        "AutoModel": UmedptModel,
        "AutoModelForImageClassification": UmedptForImageClassification,
        "AutoModelForSemanticSegmentation": UmedptForSemanticSegmentation,
        "AutoModelForObjectDetection": UmedptForObjectDetection,
        "AutoBackbone": UmedptBackbone,
    },
    source_dir=Path(__file__).parent,
    example_inputs=square_image_inputs,
    card_context=card_context,
    variants=VARIANTS,
    presets=PRESETS,
)

__all__ = [
    "FAMILY",
    "UmedptBackbone",
    "UmedptConfig",
    "UmedptForImageClassification",
    "UmedptForObjectDetection",
    "UmedptForSemanticSegmentation",
    "UmedptModel",
    "UmedptPreTrainedModel",
]
