"""Medical preprocessing: the declarative ``MedicalImageProcessor``, its presets and sliding-window tiling."""

from hub.processing.presets import PRESETS, preset
from hub.processing.processor import MedicalImageProcessor, Prepared, SpatialRecord, Tiled
from hub.processing.tiling import TilingPlan, extract_tiles, plan_tiles, stitch_tiles

__all__ = [
    "PRESETS",
    "MedicalImageProcessor",
    "Prepared",
    "SpatialRecord",
    "Tiled",
    "TilingPlan",
    "extract_tiles",
    "plan_tiles",
    "preset",
    "stitch_tiles",
]
