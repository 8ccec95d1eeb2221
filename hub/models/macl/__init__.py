"""MACL: multi-level asymmetric contrastive pre-training of a U-Net on CT/MRI slices (2D; 3D as medhub's extension)."""

import torch

from hub.models.family import Family

from . import variants
from .configuration_macl import MaclConfig
from .modeling_macl import (
    MaclForPreTraining,
    MaclForSemanticSegmentation,
    MaclModel,
    MaclPreTrainedModel,
    MaclPreTrainingOutput,
)


def image_or_volume_inputs(config: MaclConfig, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded standard-normal `pixel_values` of shape (batch, num_channels, image_size x spatial_dims)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, config.num_channels) + (config.image_size,) * config.spatial_dims
    return {"pixel_values": torch.randn(shape, generator=generator)}


FAMILY = Family.declare(
    MaclConfig,
    {
        "AutoModel": MaclModel,
        "AutoModelForSemanticSegmentation": MaclForSemanticSegmentation,
        "AutoModelForPreTraining": MaclForPreTraining,
    },
    variants,
    image_or_volume_inputs,
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
