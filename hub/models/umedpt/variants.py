"""UMedPT's catalogue variants, preprocessing presets and model-card variables: adding a variant is one entry here.

UMedPT takes 3-channel [0, 1] input with no mean/std.
"""

from typing import Any

from hub.models.variant import Variant, variant_maker

from .configuration_umedpt import UmedptConfig

PAPER = "Schäfer et al., UMedPT, Nat. Comput. Sci. 2024 (arXiv:2311.09847)"
WEIGHTS = (
    "encoder-1.0.4.pt.zip (Fraunhofer non-commercial research licence, no redistribution); `medhub convert umedpt`"
)

PRESETS: dict[str, dict[str, Any]] = {
    "umedpt": {
        "modality": "xray",
        "spatial_dims": 2,
        "in_channels": 3,
        "channel_policy": "repeat",
        "intensity": {"policy": "scale01"},
        "resize": [224, 224],
        "size": [224, 224],
    },
}


_umedpt = variant_maker(
    "umedpt", modality="xray", spatial_dims=2, paper=PAPER, upstream_weights=WEIGHTS, preprocessing="umedpt"
)

VARIANTS: tuple[Variant, ...] = (
    _umedpt("umedpt-swinv2-t", image_size=256),
    _umedpt(
        "umedpt-tiny",
        tiny=True,
        embed_dim=16,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=4,
        squeezer_channels=32,
        decoder_channels=[32, 16, 16, 8],
        fpn_channels=64,
        detection_num_convs=2,
        image_size=64,
    ),
)


def card_context(config: UmedptConfig) -> dict[str, object]:
    squeezer = (
        f"1x1 conv {config.stage_channels[-1]} -> {config.hidden_size}" if config.squeezer_channels else "no conv"
    )
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
