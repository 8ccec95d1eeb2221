"""MedCoSS's catalogue variants, preprocessing presets and model-card variables: adding a variant is one entry here.

MedCoSS per modality: X-ray and pathology 224x224 in [0, 1] (pathology in BGR order), CT clipped to
+-1024 HU and divided by 1024 at 1 mm, MRI clipped to its 0.2-99.8 percentiles and z-scored, volumes as
16x192x192.
"""

from typing import Any

from hub.models.variant import Variant, variant_maker

from .configuration_medcoss import MedCossConfig

PAPER = "Ye et al., MedCoSS, CVPR 2024 (arXiv:2311.17597)"
WEIGHTS = "MedCoSS_Report_Xray_CT_MR_Path_Buffer0.05 (non-commercial); `medhub convert medcoss`"

PRESETS: dict[str, dict[str, Any]] = {
    "medcoss-xray": {
        "modality": "xray",
        "spatial_dims": 2,
        "in_channels": 3,
        "channel_policy": "rgb",
        "intensity": {"policy": "scale01"},
        "resize": [224, 224],
        "size": [224, 224],
    },
    "medcoss-pathology": {
        "modality": "pathology",
        "spatial_dims": 2,
        "in_channels": 3,
        "channel_policy": "bgr",
        "intensity": {"policy": "scale01"},
        "resize": [224, 224],
        "size": [224, 224],
    },
    "medcoss-ct": {
        "modality": "ct",
        "spatial_dims": 3,
        "in_channels": 1,
        "channel_policy": "repeat",
        "intensity": {"policy": "window", "low": -1024, "high": 1024, "divide_by": 1024},
        "target_spacing": [1.0, 1.0, 1.0],
        "size": [16, 192, 192],
        "tile_overlap": 0.5,
    },
    "medcoss-mri": {
        "modality": "mri",
        "spatial_dims": 3,
        "in_channels": 1,
        "channel_policy": "repeat",
        "intensity": {"policy": "percentile_zscore", "lower": 0.2, "upper": 99.8},
        "size": [16, 192, 192],
        "tile_overlap": 0.5,
    },
}


_medcoss = variant_maker(
    "medcoss", modality="xray", spatial_dims=2, paper=PAPER, upstream_weights=WEIGHTS, preprocessing="medcoss-xray"
)

VARIANTS: tuple[Variant, ...] = (
    _medcoss("medcoss-vitb", image_size=224),
    _medcoss(
        "medcoss-tiny",
        tiny=True,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=1024,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        pretraining_image_size=32,
        pretraining_volume_size=[16, 32, 32],
        image_size=32,
    ),
)


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
            "images: "
            f"{'mean of patch tokens (cls excluded)' if config.image_pooling == 'patch_mean' else 'cls token'}; "
            "text: mean of all positions (padding included)"
        ),
    }
