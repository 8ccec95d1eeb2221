"""The grid a volume's header declares, read before its voxels are inflated or decoded.

A few hundred KB of .nii.gz or deflated multi-frame DICOM can declare a 512 x 512 x 400 volume: within the voxel
budget, but seconds of inflating and decoding before processing finds that its sliding-window tiles would not fit.
Readers hand this header view to an ``inspect`` callback first (see :func:`hub.io.read_image`), so that a caller
which knows what it will build from the volume can refuse it in milliseconds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import SimpleITK as sitk


@dataclass(frozen=True)
class DeclaredVolume:
    """A 3D volume's grid in SimpleITK's (x, y, z) order, as its reader will decode it."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    """Row-major 3 x 3 direction cosines."""
    channels: int


Inspect = Callable[[DeclaredVolume], None]
"""Called with a volume's declared grid before it is decoded; raises to refuse the volume."""


def declared_volume(path: str, image_io: str) -> DeclaredVolume | None:
    """The grid of the volume in ``path`` from its header alone (SimpleITK's ``ReadImageInformation`` with
    ``image_io``); None for what will not be read as a volume (2D, or 3D with one slice), more than 4 axes, or a
    header SimpleITK cannot read (the decoder reports what is wrong with it)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    dimension, size = reader.GetDimension(), reader.GetSize()
    if dimension not in (3, 4) or (dimension == 3 and size[2] == 1):  # MedicalImage.from_sitk: a 2D slice
        return None
    direction = [reader.GetDirection()[row * dimension : row * dimension + 3] for row in range(3)]
    channels = reader.GetNumberOfComponents() * (size[3] if dimension == 4 else 1)  # a 4th axis becomes channels
    return DeclaredVolume(
        size=tuple(int(n) for n in size[:3]),
        spacing=tuple(abs(float(s)) for s in reader.GetSpacing()[:3]),  # GDCM: < 0 for frames in descending order
        direction=tuple(float(value) for row in direction for value in row),
        channels=int(channels),
    )


def declared_nifti(header_bytes: bytes) -> DeclaredVolume | None:
    """The grid of a NIfTI volume from the decompressed bytes of its header (348 or 540 bytes and what follows)."""
    with tempfile.TemporaryDirectory(prefix="medhub-") as tmp:
        path = os.path.join(tmp, "header.nii")
        with open(path, "wb") as f:
            f.write(header_bytes)
        return declared_volume(path, "NiftiImageIO")
