"""Registers every medhub family with the transformers auto classes, and the image pipelines that read what
the processor reads (runs once, at `import hub`)."""

import transformers
from transformers import AutoConfig, AutoImageProcessor

from .models import FAMILIES
from .pipelines import register_pipelines
from .processing import MedicalImageProcessor


def register_families() -> None:
    for family in FAMILIES.values():
        AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
        AutoImageProcessor.register(
            family.config_class,
            image_processor_classes={"torchvision": MedicalImageProcessor, "pil": MedicalImageProcessor},
            exist_ok=True,
        )
        for auto_name, model_class in family.auto_classes.items():
            getattr(transformers, auto_name).register(family.config_class, model_class, exist_ok=True)
    register_pipelines()
