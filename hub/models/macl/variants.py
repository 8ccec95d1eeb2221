"""MACL's catalogue variants, preprocessing presets and model-card variables: adding a variant is one entry here.

MACL's U-Net takes one z-scored grey channel (PCL pre-processing).
"""

from typing import Any

from hub.models.variant import Variant, variant_maker

from .configuration_macl import MaclConfig

PAPER = "Zeng et al., MACL, IEEE JBHI 2026 (arXiv:2309.11876)"
WEIGHTS = "MACL_CHD/BraTS/KiTS.pth (no licence file: ask the authors before redistributing); `medhub convert macl`"

PRESETS: dict[str, dict[str, Any]] = {
    "macl": {
        "modality": "ct",
        "spatial_dims": 2,
        "in_channels": 1,
        "channel_policy": "repeat",
        "intensity": {"policy": "zscore"},
        "resize": [256, 256],
        "size": [256, 256],
    },
    "macl-3d": {
        "modality": "ct",
        "spatial_dims": 3,
        "in_channels": 1,
        "channel_policy": "repeat",
        "intensity": {"policy": "zscore"},
        "size": [32, 128, 128],
        "tile_overlap": 0.5,
    },
}


_macl_2d, _macl_3d = (
    variant_maker(
        "macl",
        modality="ct",
        spatial_dims=dims,
        paper=PAPER,
        upstream_weights=WEIGHTS,
        preprocessing=preprocessing,
        config={"spatial_dims": dims},
    )
    for dims, preprocessing in ((2, "macl"), (3, "macl-3d"))
)

VARIANTS: tuple[Variant, ...] = (
    _macl_2d("macl-unet2d", image_size=256),
    _macl_3d("macl-unet3d", image_size=64),
    _macl_2d("macl-tiny", tiny=True, base_filters=4, projection_dim=16, image_size=64),
    _macl_3d("macl-unet3d-tiny", tiny=True, base_filters=4, projection_dim=16, image_size=32),
)


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
