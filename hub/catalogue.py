"""The catalogue: every variant medhub can build, with its family, preset, modality and provenance."""

import difflib
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedConfig

from .errors import UnknownVariantError
from .models import get_family
from .processing.presets import preset
from .processing.processor import MedicalImageProcessor

MUSCLE_PAPER = "Liao et al., MUSCLE, MICCAI 2022 (arXiv:2310.02000)"
MUSCLE_WEIGHTS = "none released upstream; medhub trains its own"


@dataclass(frozen=True)
class Variant:
    """A buildable model: `config` overrides the family config's defaults; `preprocessing` names a preset of
    `hub.processing.presets` (the one definition of each family's preprocessing)."""

    id: str
    family: str
    config: dict[str, Any]
    modality: str
    spatial_dims: int
    paper: str
    upstream_weights: str
    preprocessing: str
    tiny: bool = False

    def build_config(self, **overrides: Any) -> PreTrainedConfig:
        return get_family(self.family).config_class(**{**self.config, **overrides})

    def processor_spec(self) -> dict[str, Any]:
        """The preset's processor arguments; a 2D `image_size` in the config rescales `size` (and `resize`)."""
        spec = preset(self.preprocessing)
        image_size = self.config.get("image_size")
        if self.spatial_dims == 2 and image_size is not None and spec["size"] != [image_size] * 2:
            scale = image_size / spec["size"][0]
            spec["size"] = [image_size] * 2
            if spec.get("resize"):
                spec["resize"] = [round(side * scale) for side in spec["resize"]]
        return spec

    def build_processor(self) -> MedicalImageProcessor:
        return MedicalImageProcessor(**self.processor_spec())


def _muscle(variant_id: str, tiny: bool = False, **config: Any) -> Variant:
    return Variant(
        id=variant_id, family="muscle", config=config, modality="xray", spatial_dims=2, paper=MUSCLE_PAPER,
        upstream_weights=MUSCLE_WEIGHTS, preprocessing="muscle", tiny=tiny,
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
