"""Registers every medhub family with the transformers auto classes (runs once, at `import hub`)."""

import transformers
from transformers import AutoConfig

from .models import FAMILIES


def register_families() -> None:
    for family in FAMILIES.values():
        AutoConfig.register(family.model_type, family.config_class, exist_ok=True)
        for auto_name, model_class in family.auto_classes.items():
            getattr(transformers, auto_name).register(family.config_class, model_class, exist_ok=True)
