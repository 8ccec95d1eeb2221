"""Tiny repos and a small mixed image folder for the embed tests."""

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image

from hub.catalogue import get_variant
from hub.export import Provenance, export_repo
from hub.models import get_family


def tiny_encoder_repo(out: Path, variant_id: str, seed: int = 0) -> Path:
    variant = get_variant(variant_id)
    torch.manual_seed(seed)
    model = get_family(variant.family).encoder_class(variant.build_config())
    return export_repo(
        model,
        out,
        variant=variant.id,
        provenance=Provenance("random-init", "test"),
        processor=variant.build_processor(),
        modality=variant.modality,
    )


def image_folder(root: Path, count: int = 6) -> Path:
    """PNGs of varied sizes in two folders (one nested), greyscale ramps plus noise; deterministic."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        size = 64 + 16 * i
        array = (np.linspace(0, 255, size)[None, :] + rng.normal(0, 20, (size, size))).clip(0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i}.png")
    return root


def volume_folder(root: Path, count: int = 2) -> Path:
    """NIfTI volumes larger than the 3D tiny model's input, so that each is cut into several tiles."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = sitk.GetImageFromArray(rng.normal(0, 100, (40, 150 + 10 * i, 140)).astype(np.float32))
        image.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(image, str(root / f"vol{i}.nii.gz"))
    return root
