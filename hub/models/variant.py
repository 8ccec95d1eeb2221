"""A catalogue entry: one buildable model of a family. Each family lists its own in `<family>/variants.py`."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedConfig

if TYPE_CHECKING:
    from hub.processing.processor import MedicalImageProcessor


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
        # Imported here: the family packages import this module while `hub.models` is being initialised.
        from . import get_family

        return get_family(self.family).config_class(**{**self.config, **overrides})

    def processor_spec(self) -> dict[str, Any]:
        """The preset's processor arguments; the config's `image_size` sets the model input `size` (a cube for 3D)
        and rescales a 2D `resize` by the same factor, so the processor always feeds the exported input shape."""
        # Imported here: the presets are collected from the families, which import this module.
        from hub.processing.presets import preset

        spec = preset(self.preprocessing)
        image_size = self.config.get("image_size")
        if image_size is not None and spec["size"] != [image_size] * self.spatial_dims:
            scale = image_size / spec["size"][-1]
            spec["size"] = [image_size] * self.spatial_dims
            if spec.get("resize"):
                spec["resize"] = [round(side * scale) for side in spec["resize"]]
        return spec

    def build_processor(self) -> "MedicalImageProcessor":
        from hub.processing.processor import MedicalImageProcessor

        return MedicalImageProcessor(**self.processor_spec())


def variant_maker(
    family: str,
    *,
    modality: str,
    spatial_dims: int,
    paper: str,
    upstream_weights: str,
    preprocessing: str,
    config: dict[str, Any] | None = None,
) -> Callable[..., Variant]:
    """How a family's `variants.py` declares its table: `make(variant_id, tiny=False, **config)` gives a Variant
    with the fields every variant of the maker shares; `config` holds config entries they all carry."""
    shared_config = dict(config or {})

    def make(variant_id: str, tiny: bool = False, **variant_config: Any) -> Variant:
        return Variant(
            id=variant_id,
            family=family,
            config={**variant_config, **shared_config},
            modality=modality,
            spatial_dims=spatial_dims,
            paper=paper,
            upstream_weights=upstream_weights,
            preprocessing=preprocessing,
            tiny=tiny,
        )

    return make
