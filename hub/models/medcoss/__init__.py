"""MedCoSS: one ViT-B shared by report text, X-ray, CT, MRI and pathology, pretrained modality by modality."""

from pathlib import Path

from .configuration_medcoss import MedCossConfig
from .modeling_medcoss import (
    MedCossForImageClassification,
    MedCossForPreTraining,
    MedCossForSemanticSegmentation,
    MedCossModel,
    MedCossPreTrainedModel,
)
from ..family import Family, square_image_inputs


def card_context(config: MedCossConfig) -> dict[str, object]:
    return {
        "architecture": (
            f"pre-norm ViT, {config.num_hidden_layers} layers, width {config.hidden_size}, "
            f"{config.num_attention_heads} heads, MLP {config.intermediate_size}, layer scale, no final norm"
        ),
        "hidden_size": config.hidden_size,
        "num_channels": config.num_channels,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "max_image_side": int(config.max_positions_2d**0.5) * config.patch_size,
        "max_positions_3d": config.max_positions_3d,
        "max_text_positions": config.max_text_positions,
        "text_mask_mode": config.text_mask_mode,
        "pooling_text": (
            f"images: {'mean of patch tokens (cls excluded)' if config.image_pooling == 'patch_mean' else 'cls token'}; "
            "text: mean of all positions (padding included)"
        ),
    }


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
