"""UMedPT: a Swin V2 encoder pre-trained on many biomedical tasks at once (classification, segmentation, detection)."""

from pathlib import Path

from .configuration_umedpt import UmedptConfig
from .modeling_umedpt import (
    UmedptBackbone,
    UmedptForImageClassification,
    UmedptForObjectDetection,
    UmedptForSemanticSegmentation,
    UmedptModel,
    UmedptObjectDetectionOutput,
    UmedptPreTrainedModel,
)
from ..family import Family, square_image_inputs


def card_context(config: UmedptConfig) -> dict[str, object]:
    squeezer = f"1x1 conv {config.stage_channels[-1]} -> {config.hidden_size}" if config.squeezer_channels else "no conv"
    return {
        "architecture": (
            f"Swin V2, embed_dim {config.embed_dim}, depths {config.depths}, heads {config.num_heads}, "
            f"window {config.window_size}; squeezer: {squeezer}, GroupNorm(1, C), GELU"
        ),
        "hidden_size": config.hidden_size,
        "pooling_text": "global average of the last stage, then the squeezer (conv, GroupNorm, GELU)",
        "num_channels": config.num_channels,
        "image_size": config.image_size,
        "input_multiple": config.input_multiple,
    }


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
)

__all__ = [
    "FAMILY",
    "UmedptBackbone",
    "UmedptConfig",
    "UmedptForImageClassification",
    "UmedptForObjectDetection",
    "UmedptForSemanticSegmentation",
    "UmedptModel",
    "UmedptObjectDetectionOutput",
    "UmedptPreTrainedModel",
]
