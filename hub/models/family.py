"""What the hub needs to know about a model family to register, export and verify it."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel

from .variant import Variant

ExampleInputs = Callable[[PreTrainedConfig, int, int], dict[str, torch.Tensor]]
CardContext = Callable[[PreTrainedConfig], dict[str, object]]


def square_image_inputs(config: PreTrainedConfig, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded standard-normal `pixel_values` of shape (batch, num_channels, image_size, image_size)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    return {"pixel_values": torch.randn(shape, generator=generator)}


@dataclass(frozen=True)
class Family:
    """One model family: its config, the model class behind each transformers auto class, and its sources.

    `source_dir` holds `configuration_<family>.py` and `modeling_<family>.py`, which are copied into every
    exported repo so that `trust_remote_code=True` works where medhub is not installed.
    `example_inputs(config, batch_size, seed)` builds the deterministic input of the golden regression check.
    `card_context(config)` gives the family-specific variables of its model card template.
    `variants` and `presets` (preprocessing presets by name) come from the family's `variants.py`; the catalogue
    and `hub.processing.presets` only collect them.
    """

    model_type: str
    config_class: type[PreTrainedConfig]
    auto_classes: dict[str, type[PreTrainedModel]]
    source_dir: Path
    example_inputs: ExampleInputs
    card_context: CardContext
    variants: tuple[Variant, ...]
    presets: dict[str, dict[str, object]]

    @classmethod
    def declare(
        cls,
        config_class: type[PreTrainedConfig],
        auto_classes: dict[str, type[PreTrainedModel]],
        variants: ModuleType,
        example_inputs: ExampleInputs = square_image_inputs,
    ) -> "Family":
        """The family of a model package: `model_type` from its config class, `source_dir` the folder of the
        config's module, and `variants`, `presets` and `card_context` from its `variants` module."""
        return cls(
            model_type=config_class.model_type,
            config_class=config_class,
            auto_classes=auto_classes,
            source_dir=Path(inspect.getfile(config_class)).parent,
            example_inputs=example_inputs,
            card_context=variants.card_context,
            variants=variants.VARIANTS,
            presets=variants.PRESETS,
        )

    @property
    def encoder_class(self) -> type[PreTrainedModel]:
        return self.auto_classes["AutoModel"]

    def load_encoder(self, repo_dir: Path) -> PreTrainedModel:
        """The repo's encoder. Head weights that the encoder does not use are expected here, so transformers'
        load report (a warning listing them) is silenced for this call."""
        previous = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            return self.encoder_class.from_pretrained(repo_dir)
        finally:
            transformers.logging.set_verbosity(previous)

    @property
    def source_files(self) -> list[Path]:
        return sorted(self.source_dir.glob(f"*_{self.model_type}.py"))

    def auto_map(self) -> dict[str, str]:
        """The `auto_map` of `config.json`: auto class -> `module.Class` inside the exported repo."""
        entries = {"AutoConfig": f"configuration_{self.model_type}.{self.config_class.__name__}"}
        for auto_name, model_class in self.auto_classes.items():
            entries[auto_name] = f"modeling_{self.model_type}.{model_class.__name__}"
        return entries
