"""Write a label mask back in exactly the geometry of the image it was predicted for."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from hub.errors import InputError
from hub.io.image import MedicalImage

PNG = "png"
NIFTI = "nifti"
# PNG masks of up to 256 labels carry a palette so that they are visible; pixel values stay the label indices.
_COLOURS = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]
MASK_PALETTE = [
    value
    for index in range(256)
    for value in (
        _COLOURS[index % len(_COLOURS)] if index < len(_COLOURS) else _COLOURS[1 + (index - 1) % (len(_COLOURS) - 1)]
    )
]


def _label_array(mask: np.ndarray, like: MedicalImage) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != like.spatial_shape:
        raise InputError(f"mask of shape {mask.shape} does not match the image's spatial shape {like.spatial_shape}")
    if mask.dtype.kind == "f" and not np.array_equal(mask, np.round(mask)):
        raise InputError("mask holds non-integer values; expected integer class labels")
    if mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise InputError(f"mask labels span [{mask.min()}, {mask.max()}]; expected labels in [0, 65535]")
    return mask.astype(np.uint8 if not mask.size or mask.max() <= 255 else np.uint16)


def _format(like: MedicalImage, fmt: str | None) -> str:
    fmt = fmt or (PNG if like.spatial_dims == 2 else NIFTI)
    if fmt not in (PNG, NIFTI):
        raise InputError(f"mask format {fmt!r} is unknown; expected 'png' or 'nifti'")
    if fmt == PNG and like.spatial_dims != 2:
        raise InputError("a 3D mask cannot be written as PNG; expected format 'nifti'")
    return fmt


def mask_to_sitk(mask: np.ndarray, like: MedicalImage) -> sitk.Image:
    """The mask as a SimpleITK label image carrying ``like``'s spacing, origin and direction."""
    image = sitk.GetImageFromArray(_label_array(mask, like))
    image.SetSpacing(like.spacing)
    image.SetOrigin(like.origin)
    image.SetDirection(like.direction)
    return image


def encode_mask(mask: np.ndarray, like: MedicalImage, fmt: str | None = None) -> bytes:
    """Encode a mask as PNG (2D default) or gzipped NIfTI (3D default) bytes in ``like``'s geometry."""
    fmt = _format(like, fmt)
    if fmt == PNG:
        buffer = io.BytesIO()
        labels = _label_array(mask, like)
        png = Image.fromarray(labels)
        if labels.dtype == np.uint8:
            png = Image.frombytes("P", png.size, np.ascontiguousarray(labels).tobytes())
            png.putpalette(MASK_PALETTE)
        png.save(buffer, format="PNG")
        return buffer.getvalue()
    with tempfile.TemporaryDirectory(prefix="medhub-") as tmp:
        path = os.path.join(tmp, "mask.nii.gz")
        sitk.WriteImage(mask_to_sitk(mask, like), path, useCompression=True)
        return Path(path).read_bytes()


def write_mask(mask: np.ndarray, like: MedicalImage, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write a mask file for ``like``: PNG for 2D, NIfTI (.nii or .nii.gz by the path) for 3D by default."""
    path = Path(path)
    fmt = _format(like, fmt)
    if fmt == PNG:
        Image.fromarray(_label_array(mask, like)).save(path, format="PNG")
    else:
        if not path.name.endswith((".nii", ".nii.gz")):
            raise InputError(f"NIfTI mask path {path.name!r} must end with .nii or .nii.gz")
        sitk.WriteImage(mask_to_sitk(mask, like), str(path), useCompression=path.name.endswith(".gz"))
    return path
