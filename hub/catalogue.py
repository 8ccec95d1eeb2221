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
MEDCOSS_PAPER = "Ye et al., MedCoSS, CVPR 2024 (arXiv:2311.17597)"
MEDCOSS_WEIGHTS = "MedCoSS_Report_Xray_CT_MR_Path_Buffer0.05 (non-commercial); `medhub convert medcoss`"
MACL_PAPER = "Zeng et al., MACL, IEEE JBHI 2026 (arXiv:2309.11876)"
MACL_WEIGHTS = "MACL_CHD/BraTS/KiTS.pth (no licence file: ask the authors before redistributing); `medhub convert macl`"
UMEDPT_PAPER = "Schäfer et al., UMedPT, Nat. Comput. Sci. 2024 (arXiv:2311.09847)"
UMEDPT_WEIGHTS = "encoder-1.0.4.pt.zip (Fraunhofer non-commercial research licence, no redistribution); `medhub convert umedpt`"


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
        """The preset's processor arguments; the config's `image_size` sets the model input `size` (a cube for 3D)
        and rescales a 2D `resize` by the same factor, so the processor always feeds the exported input shape."""
        spec = preset(self.preprocessing)
        image_size = self.config.get("image_size")
        if image_size is not None and spec["size"] != [image_size] * self.spatial_dims:
            scale = image_size / spec["size"][-1]
            spec["size"] = [image_size] * self.spatial_dims
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


def _medcoss(variant_id: str, tiny: bool = False, **config: Any) -> Variant:
    return Variant(
        id=variant_id, family="medcoss", config=config, modality="xray", spatial_dims=2, paper=MEDCOSS_PAPER,
        upstream_weights=MEDCOSS_WEIGHTS, preprocessing="medcoss-xray", tiny=tiny,
    )


def _macl(variant_id: str, spatial_dims: int = 2, tiny: bool = False, **config: Any) -> Variant:
    return Variant(
        id=variant_id, family="macl", config={**config, "spatial_dims": spatial_dims}, modality="ct",
        spatial_dims=spatial_dims, paper=MACL_PAPER, upstream_weights=MACL_WEIGHTS,
        preprocessing="macl" if spatial_dims == 2 else "macl-3d", tiny=tiny,
    )


def _umedpt(variant_id: str, tiny: bool = False, **config: Any) -> Variant:
    return Variant(
        id=variant_id, family="umedpt", config=config, modality="xray", spatial_dims=2, paper=UMEDPT_PAPER,
        upstream_weights=UMEDPT_WEIGHTS, preprocessing="umedpt", tiny=tiny,
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
        _medcoss("medcoss-vitb", image_size=224),
        _medcoss(
            "medcoss-tiny", tiny=True, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=1024,
            decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32, pretraining_image_size=32, pretraining_volume_size=[16, 32, 32],
            image_size=32,
        ),
        _macl("macl-unet2d", image_size=256),
        _macl("macl-unet3d", spatial_dims=3, image_size=64),
        _macl("macl-tiny", tiny=True, base_filters=4, projection_dim=16, image_size=64),
        _macl("macl-unet3d-tiny", spatial_dims=3, tiny=True, base_filters=4, projection_dim=16, image_size=32),
        _umedpt("umedpt-swinv2-t", image_size=256),
        _umedpt(
            "umedpt-tiny", tiny=True, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4,
            squeezer_channels=32, decoder_channels=[32, 16, 16, 8], fpn_channels=64, detection_num_convs=2,
            image_size=64,
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
