"""MUSCLE's catalogue variants, preprocessing presets and model-card variables: adding a variant is one entry here.

MUSCLE follows the benchmarking study's ResNet-50 recipe (Resize 256, CenterCrop 224, ImageNet
mean/std).
"""

from typing import Any

from hub.models.variant import Variant, variant_maker

from .configuration_muscle import MuscleConfig

PAPER = "Liao et al., MUSCLE, MICCAI 2022 (arXiv:2310.02000)"
WEIGHTS = "none released upstream; medhub trains its own"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


PRESETS: dict[str, dict[str, Any]] = {
    "muscle": {
        "modality": "xray",
        "spatial_dims": 2,
        "in_channels": 3,
        "channel_policy": "repeat",
        "intensity": {"policy": "scale01"},
        "resize": [256, 256],
        "size": [224, 224],
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    },
}


_muscle = variant_maker(
    "muscle", modality="xray", spatial_dims=2, paper=PAPER, upstream_weights=WEIGHTS, preprocessing="muscle"
)

VARIANTS: tuple[Variant, ...] = (
    _muscle("muscle-resnet18", depths=[2, 2, 2, 2], block_type="basic", image_size=224),
    _muscle("muscle-resnet50", depths=[3, 4, 6, 3], block_type="bottleneck", image_size=224),
    _muscle(
        "muscle-resnet18-tiny",
        tiny=True,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        stem_width=8,
        block_type="basic",
        image_size=64,
        fpn_channels=16,
        detection_min_size=64,  # Faster R-CNN at the preset's own side, not resized to 512 px
        detection_max_size=64,
    ),
)


def card_context(config: MuscleConfig) -> dict[str, object]:
    depth = 2 + sum(config.depths) * (3 if config.block_type == "bottleneck" else 2)
    return {
        "architecture": f"ResNet-{depth} layout, {config.block_type} blocks, widths {config.hidden_sizes}",
        "hidden_size": config.hidden_size,
        "pooling_text": f"{config.pooling} pooling of the last stage map",
        "num_channels": config.num_channels,
        "image_size": config.image_size,
    }
