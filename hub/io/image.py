"""The one image type every reader returns: pixel array + physical geometry + header facts.

Geometry follows SimpleITK/ITK: ``size``, ``spacing`` and ``origin`` are in (x, y[, z]) order, ``direction`` is
the row-major flattened direction-cosine matrix (4 or 9 values), physical space is LPS. The array is in numpy
order: (H, W) or (D, H, W), with a trailing channel axis (..., C) for colour or multi-channel images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

MONOCHROME1 = "MONOCHROME1"
MONOCHROME2 = "MONOCHROME2"
RGB = "RGB"


@dataclass
class MedicalImage:
    """A decoded 2D image or 3D volume with the geometry needed to write results back in its space.

    ``photometric`` describes ``array`` as it is (readers turn MONOCHROME1 into MONOCHROME2 values);
    ``bit_depth`` is the stored bit depth of the source (None when unknown, e.g. float input);
    ``meta`` holds non-identifying facts about the source (format, DICOM modality, transfer syntax, ...);
    ``dicom_headers`` the source's DICOM headers without pixel data, one per slice in array order (empty for
    other inputs): the DICOM SEG/SR writers reference them. They identify the patient: never log them.
    """

    array: np.ndarray
    spatial_dims: int
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    modality: str | None = None
    photometric: str = MONOCHROME2
    bit_depth: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    dicom_headers: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        extra = self.array.ndim - self.spatial_dims
        if extra not in (0, 1):
            raise ValueError(
                f"array of shape {self.array.shape} does not fit spatial_dims={self.spatial_dims} "
                "(expected the spatial axes plus at most one trailing channel axis)"
            )
        n = self.spatial_dims
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = tuple(float(v) for v in self.direction)
        if len(self.spacing) != n or len(self.origin) != n or len(self.direction) != n * n:
            raise ValueError(
                f"geometry does not match spatial_dims={n}: spacing, origin need {n} values, direction {n * n}"
            )

    @property
    def size(self) -> tuple[int, ...]:
        """Spatial size in (x, y[, z]) order, as SimpleITK reports it."""
        return tuple(int(v) for v in self.spatial_shape[::-1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial shape in numpy order: (H, W) or (D, H, W)."""
        return tuple(self.array.shape[: self.spatial_dims])

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == self.spatial_dims else int(self.array.shape[-1])

    def geometry(self) -> dict[str, tuple]:
        return {"size": self.size, "spacing": self.spacing, "origin": self.origin, "direction": self.direction}

    def with_array(self, array: np.ndarray, **changes: Any) -> MedicalImage:
        """A copy holding ``array`` (same spatial shape) and this image's geometry."""
        return replace(self, array=array, meta=dict(self.meta), **changes)

    def to_sitk(self) -> sitk.Image:
        """The image as a SimpleITK image with this geometry (channels become vector components)."""
        image = sitk.GetImageFromArray(self.array, isVector=self.array.ndim > self.spatial_dims)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(
        cls,
        image: sitk.Image | sitk.ImageFileReader,
        array: np.ndarray | None = None,
        *,
        keep_volume: bool = False,
        **facts: Any,
    ) -> MedicalImage:
        """Wrap a SimpleITK image, dropping a trailing singleton z axis of 2D slices unless ``keep_volume`` (a
        volume resampled to one slice stays a volume). `image` may instead be a reader after
        ``ReadImageInformation()``, with the pixels, in SimpleITK's (z, y, x) order, in `array`."""
        dims = image.GetDimension()
        if dims not in (2, 3):
            raise ValueError(f"SimpleITK image of dimension {dims} is not 2D or 3D")
        if array is None:
            array = sitk.GetArrayFromImage(image)
        spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
        if dims == 3 and image.GetSize()[2] == 1 and not keep_volume:
            array = array[0]
            dims = 2
            spacing, origin = spacing[:2], origin[:2]
            direction = (direction[0], direction[1], direction[3], direction[4])
        return cls(array=array, spatial_dims=dims, spacing=spacing, origin=origin, direction=direction, **facts)


def identity_geometry(spatial_dims: int) -> dict[str, tuple[float, ...]]:
    """Unit spacing, zero origin and identity direction, for inputs that carry no geometry."""
    eye = np.eye(spatial_dims).ravel()
    return {
        "spacing": (1.0,) * spatial_dims,
        "origin": (0.0,) * spatial_dims,
        "direction": tuple(float(v) for v in eye),
    }
