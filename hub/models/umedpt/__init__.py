"""UMedPT: a Swin V2 encoder pre-trained on many biomedical tasks at once (classification, segmentation, detection)."""

from hub.models.family import Family

from . import variants
from .configuration_umedpt import UmedptConfig
from .modeling_umedpt import (
    UmedptBackbone,
    UmedptForImageClassification,
    UmedptForObjectDetection,
    UmedptForSemanticSegmentation,
    UmedptModel,
    UmedptPreTrainedModel,
)

FAMILY = Family.declare(
    UmedptConfig,
    {
        "AutoModel": UmedptModel,
        "AutoModelForImageClassification": UmedptForImageClassification,
        "AutoModelForSemanticSegmentation": UmedptForSemanticSegmentation,
        "AutoModelForObjectDetection": UmedptForObjectDetection,
        "AutoBackbone": UmedptBackbone,
    },
    variants,
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
