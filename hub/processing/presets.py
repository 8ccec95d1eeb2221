"""Named preprocessing presets: each family declares its policy as a plain dict.

Each preset follows its paper or the authors' released code: MUSCLE follows the benchmarking study's
ResNet-50 recipe (Resize 256, CenterCrop 224, ImageNet mean/std); UMedPT takes 3-channel [0, 1] input with no
mean/std; MACL's U-Net takes one z-scored grey channel (PCL pre-processing); MedCoSS per modality:
X-ray and pathology 224x224 in [0, 1] (pathology in BGR order), CT clipped to +-1024 HU and divided by 1024 at
1 mm, MRI clipped to its 0.2-99.8 percentiles and z-scored, volumes as 16x192x192.
"""

from __future__ import annotations

import copy
from typing import Any

from hub.errors import UnknownVariantError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

PRESETS: dict[str, dict[str, Any]] = {
    "muscle": {
        "modality": "xray", "spatial_dims": 2, "in_channels": 3, "channel_policy": "repeat",
        "intensity": {"policy": "scale01"}, "resize": [256, 256], "size": [224, 224],
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
    },
    "umedpt": {
        "modality": "xray", "spatial_dims": 2, "in_channels": 3, "channel_policy": "repeat",
        "intensity": {"policy": "scale01"}, "resize": [224, 224], "size": [224, 224],
    },
    "macl": {
        "modality": "ct", "spatial_dims": 2, "in_channels": 1, "channel_policy": "repeat",
        "intensity": {"policy": "zscore"}, "resize": [256, 256], "size": [256, 256],
    },
    "macl-3d": {
        "modality": "ct", "spatial_dims": 3, "in_channels": 1, "channel_policy": "repeat",
        "intensity": {"policy": "zscore"}, "size": [32, 128, 128], "tile_overlap": 0.5,
    },
    "medcoss-xray": {
        "modality": "xray", "spatial_dims": 2, "in_channels": 3, "channel_policy": "rgb",
        "intensity": {"policy": "scale01"}, "resize": [224, 224], "size": [224, 224],
    },
    "medcoss-pathology": {
        "modality": "pathology", "spatial_dims": 2, "in_channels": 3, "channel_policy": "bgr",
        "intensity": {"policy": "scale01"}, "resize": [224, 224], "size": [224, 224],
    },
    "medcoss-ct": {
        "modality": "ct", "spatial_dims": 3, "in_channels": 1, "channel_policy": "repeat",
        "intensity": {"policy": "window", "low": -1024, "high": 1024, "divide_by": 1024},
        "target_spacing": [1.0, 1.0, 1.0], "size": [16, 192, 192], "tile_overlap": 0.5,
    },
    "medcoss-mri": {
        "modality": "mri", "spatial_dims": 3, "in_channels": 1, "channel_policy": "repeat",
        "intensity": {"policy": "percentile_zscore", "lower": 0.2, "upper": 99.8}, "size": [16, 192, 192],
        "tile_overlap": 0.5,
    },
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``name`` with ``overrides`` applied, ready for ``MedicalImageProcessor(**preset)``."""
    if name not in PRESETS:
        raise UnknownVariantError(f"preprocessing preset {name!r} is unknown; expected one of {sorted(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), **overrides}
