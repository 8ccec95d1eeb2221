"""`torchvision:resnet50` study backbones: the supervised ImageNet baseline of the benchmarking study (torchvision's
original ImageNet-1k weights, as its torchvision 0.9 loaded them), read offline from torch's hub cache or from a
file named as `torchvision:resnet50=FILE`, and converted once into a `muscle-resnet50` repo."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hub.convert.resnet_ssl import convert_resnet50_ssl
from training.errors import TrainingConfigError

PREFIX = "torchvision:"
# the weights file torchvision downloads for resnet50(weights="IMAGENET1K_V1") (the study's pretrained=True)
WEIGHTS_FILES = {"resnet50": "resnet50-0676ba61.pth"}


def imagenet_checkpoint(source: str) -> Path:
    """The local weights file of a `torchvision:<name>[=FILE]` backbone; a one-sentence error when it is absent."""
    name, _, file = source.removeprefix(PREFIX).partition("=")
    if name not in WEIGHTS_FILES:
        raise TrainingConfigError(
            f"backbone {source!r}: only {', '.join(PREFIX + n for n in WEIGHTS_FILES)} converts "
            "to a medhub encoder (muscle-resnet50)"
        )
    path = Path(file) if file else Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILES[name]
    if not path.is_file():
        raise TrainingConfigError(
            f"backbone {source!r}: no ImageNet weights at {path} (offline); fetch them once with "
            f"torchvision.models.{name}(weights='IMAGENET1K_V1') or name a file as "
            f"{PREFIX}{name}=FILE"
        )
    return path


def imagenet_repo(source: str, folder: Path) -> Path:
    """`folder` holding the converted repo of a `torchvision:` backbone, written once."""
    if not (folder / "config.json").is_file():
        checkpoint = imagenet_checkpoint(source)
        partial = folder.with_name(f"{folder.name}.{os.getpid()}")
        convert_resnet50_ssl(checkpoint, partial, license="bsd-3-clause", overwrite=True)
        os.replace(partial, folder)
    return folder
