"""The catalogue: every variant medhub can build, with its family, preset, modality and provenance."""

import difflib
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedConfig

from .errors import UnknownVariantError
from .models import get_family
from .processing.processor import MedicalImageProcessor

MUSCLE_PAPER = "Liao et al., MUSCLE, MICCAI 2022 (arXiv:2310.02000)"
MUSCLE_WEIGHTS = "none released upstream; medhub trains its own"

# Grey radiographs scaled to [0, 1] by bit depth, copied to 3 channels, ImageNet mean/std (ResNet convention).
XRAY_2D = {
    "modality": "xray",
    "spatial_dims": 2,
    "in_channels": 3,
    "channel_policy": "repeat",
    "intensity": {"policy": "scale01"},
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


@dataclass(frozen=True)
class Variant:
    """A buildable model: `config` overrides the family config's defaults; `preprocessing` is the processor spec."""

    id: str
    family: str
    config: dict[str, Any]
    modality: str
    spatial_dims: int
    paper: str
    upstream_weights: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False

    def build_config(self, **overrides: Any) -> PreTrainedConfig:
        return get_family(self.family).config_class(**{**self.config, **overrides})

    def processor_spec(self) -> dict[str, Any]:
        """The processor arguments, with the input size taken from the config preset."""
        size = self.config.get("image_size", 224)
        return {**self.preprocessing, "size": [size] * self.spatial_dims}

    def build_processor(self) -> MedicalImageProcessor:
        return MedicalImageProcessor(**self.processor_spec())


def _muscle(variant_id: str, tiny: bool = False, **config: Any) -> Variant:
    return Variant(
        id=variant_id, family="muscle", config=config, modality="xray", spatial_dims=2, paper=MUSCLE_PAPER,
        upstream_weights=MUSCLE_WEIGHTS, preprocessing=XRAY_2D, tiny=tiny,
    )


VARIANTS: dict[str, Variant] = {
    variant.id: variant
    for variant in (
        _muscle("muscle-resnet18", depths=[2, 2, 2, 2], block_type="basic", image_size=224),
        _muscle("muscle-resnet50", depths=[3, 4, 6, 3], block_type="bottleneck", image_size=224),
        _muscle(
            "muscle-resnet18-tiny", tiny=True, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], stem_width=8,
            block_type="basic", image_size=64,
        ),
    )
}


def get_variant(variant_id: str) -> Variant:
    """The catalogue entry for `variant_id`, or an error that suggests the closest ids."""
    try:
        return VARIANTS[variant_id]
    except KeyError:
        close = difflib.get_close_matches(variant_id, VARIANTS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; run `medhub models` for the list"
        raise UnknownVariantError(f"unknown variant {variant_id!r}{hint}") from None
