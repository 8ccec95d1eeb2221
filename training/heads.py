"""Task heads: which model class of a family learns a task kind, and sharing one encoder between heads."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from hub.models import Family

from .data import TASK_KINDS
from .errors import TrainingConfigError

AUTO_CLASS_OF_KIND = {
    "classification": "AutoModelForImageClassification",
    "segmentation": "AutoModelForSemanticSegmentation",
    "detection": "AutoModelForObjectDetection",
}


def head_class(family: Family, kind: str, task: str) -> type[PreTrainedModel]:
    """The family's model class for `kind`; a clear error (before any training) when the family has none."""
    if kind not in TASK_KINDS:
        raise TrainingConfigError(f"task {task!r}: kind {kind!r} is not one of {', '.join(TASK_KINDS)}")
    auto_name = AUTO_CLASS_OF_KIND[kind]
    if auto_name not in family.auto_classes:
        has = [k for k, name in AUTO_CLASS_OF_KIND.items() if name in family.auto_classes]
        raise TrainingConfigError(
            f"task {task!r}: the {family.model_type} family has no {kind} head (it has: {', '.join(has) or 'none'})"
        )
    return family.auto_classes[auto_name]


def encoder_of(model: PreTrainedModel) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def share_encoder(model: PreTrainedModel, encoder: nn.Module) -> PreTrainedModel:
    """Make `model` use `encoder` (by reference) as its base model, so all heads train one backbone."""
    setattr(model, model.base_model_prefix, encoder)
    return model


def head_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """The parameters of `model` that are not its encoder's."""
    shared = {id(p) for p in encoder_of(model).parameters()}
    return [p for p in model.parameters() if id(p) not in shared]


def label_config(class_names: list[str]) -> dict:
    """`num_labels`, `id2label` and `label2id` for a head's config."""
    return {
        "num_labels": len(class_names),
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: index for index, name in enumerate(class_names)},
    }
