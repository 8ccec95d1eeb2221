"""MACL: multi-level asymmetric contrastive pre-training of a U-Net on CT/MRI slices (2D; 3D as medhub's extension)."""

from pathlib import Path

import torch

from .configuration_macl import MaclConfig
from .modeling_macl import (
    MaclForPreTraining,
    MaclForSemanticSegmentation,
    MaclModel,
    MaclPreTrainedModel,
    MaclPreTrainingOutput,
)
from ..family import Family


def image_or_volume_inputs(config: MaclConfig, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded standard-normal `pixel_values` of shape (batch, num_channels, image_size x spatial_dims)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, config.num_channels) + (config.image_size,) * config.spatial_dims
    return {"pixel_values": torch.randn(shape, generator=generator)}


def card_context(config: MaclConfig) -> dict[str, object]:
    side = " x ".join([str(config.image_size)] * config.spatial_dims)
    return {
        "architecture": f"{config.spatial_dims}D U-Net, F={config.base_filters}, widths {config.stage_channels}",
        "hidden_size": config.hidden_size,
        "pooling_text": "global average pool of the encoder's bottleneck",
        "num_channels": config.num_channels,
        "input_shape": f"{config.num_channels} x {side}",
        "example_shape": ", ".join(["1", str(config.num_channels)] + [str(config.image_size)] * config.spatial_dims),
        "spatial_dims": config.spatial_dims,
        "input_multiple": config.input_multiple,
    }


FAMILY = Family(
    model_type="macl",
    config_class=MaclConfig,
    auto_classes={
        "AutoModel": MaclModel,
        "AutoModelForSemanticSegmentation": MaclForSemanticSegmentation,
        "AutoModelForPreTraining": MaclForPreTraining,
    },
    source_dir=Path(__file__).parent,
    example_inputs=image_or_volume_inputs,
    card_context=card_context,
)

__all__ = [
    "FAMILY",
    "MaclConfig",
    "MaclForPreTraining",
    "MaclForSemanticSegmentation",
    "MaclModel",
    "MaclPreTrainedModel",
    "MaclPreTrainingOutput",
    "image_or_volume_inputs",
]
