"""MUSCLE: multi-dataset MoCo then multi-task continual learning on X-rays (ResNet-18/50)."""

from pathlib import Path

from .configuration_muscle import MuscleConfig
from .modeling_muscle import (
    MuscleBackbone,
    MuscleForImageClassification,
    MuscleForObjectDetection,
    MuscleForSemanticSegmentation,
    MuscleModel,
    MusclePreTrainedModel,
)
from ..family import Family, square_image_inputs


def card_context(config: MuscleConfig) -> dict[str, object]:
    depth = 2 + sum(config.depths) * (3 if config.block_type == "bottleneck" else 2)
    return {
        "architecture": f"ResNet-{depth} layout, {config.block_type} blocks, widths {config.hidden_sizes}",
        "hidden_size": config.hidden_size,
        "pooling_text": f"{config.pooling} pooling of the last stage map",
        "num_channels": config.num_channels,
        "image_size": config.image_size,
    }


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
