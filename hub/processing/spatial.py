"""Spatial steps of the processor and their inverses: resize, centre crop/pad, 3D resampling.

Arrays are channels first: (C, H, W) or (C, D, H, W). Sizes and spacings given to the processor are in that
numpy order too ((D, H, W), spacing in mm as (z, y, x)); SimpleITK's (x, y, z) order stays inside this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from hub.errors import LimitExceededError
from hub.io.limits import DEFAULT_LIMITS


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space, in SimpleITK order: size/spacing/origin (x, y, z), direction row-major."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(tuple(image.GetSize()), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def to_dict(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in ("size", "spacing", "origin", "direction")}


def resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(Bi/tri)linear resize of the spatial axes (half-pixel centres); 2D downsampling is antialiased."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if len(shape) == 2:
        antialias = any(o < i for o, i in zip(shape, array.shape[1:]))
        out = F.interpolate(tensor, size=tuple(shape), mode="bilinear", align_corners=False, antialias=antialias)
    else:
        out = F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0].numpy()


def centre_window(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...]:
    """Start of a centred ``out`` window in ``shape`` (negative where the window pads)."""
    return tuple((s - o) // 2 for s, o in zip(shape, out))


def _overlap(start: int, out: int, length: int) -> tuple[slice, slice]:
    lo, hi = max(start, 0), min(start + out, length)
    return slice(lo, hi), slice(lo - start, hi - start)


def crop_pad(array: np.ndarray, out: tuple[int, ...], starts: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """Take the window of size ``out`` starting at ``starts`` from (C, *spatial); outside is ``fill``."""
    result = np.full((array.shape[0], *out), fill, dtype=array.dtype)
    src, dst = zip(*(_overlap(s, o, n) for s, o, n in zip(starts, out, array.shape[1:])))
    result[(slice(None),) + dst] = array[(slice(None),) + src]
    return result


def uncrop_pad(array: np.ndarray, shape: tuple[int, ...], starts: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """Inverse of :func:`crop_pad`: put the window back into an array of spatial ``shape``."""
    result = np.full((array.shape[0], *shape), fill, dtype=array.dtype)
    src, dst = zip(*(_overlap(s, o, n) for s, o, n in zip(starts, array.shape[1:], shape)))
    result[(slice(None),) + src] = array[(slice(None),) + dst]
    return result


def reorient(image: sitk.Image, orientation: str | None) -> sitk.Image:
    """Permute/flip axes so the direction matches ``orientation`` (ITK's DICOMOrient code; 'LPS' = identity)."""
    if not orientation:
        return image
    return sitk.DICOMOrient(image, orientation)


def planned_size(
    size: tuple[int, ...],
    spacing: tuple[float, ...],
    direction: tuple[float, ...],
    orientation: str | None,
    spacing_zyx: tuple[float, ...] | None,
    components: int = 1,
    max_voxels: int = DEFAULT_LIMITS.max_voxels,
) -> tuple[int, ...]:
    """The (z, y, x) size that :func:`reorient` then :func:`resample_spacing` would give a volume of this (x, y, z)
    ``size``, ``spacing``, row-major ``direction`` and ``components`` values per voxel, worked out without its
    voxels (with the same refusal over ``max_voxels``)."""
    if orientation:  # DICOMOrient only permutes and flips axes: its permutation, found on a one-voxel image
        probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        probe.SetDirection(direction)
        orient = sitk.DICOMOrientImageFilter()
        orient.SetDesiredCoordinateOrientation(orientation)
        orient.Execute(probe)
        order = orient.GetPermuteOrder()
        size, spacing = tuple(size[i] for i in order), tuple(spacing[i] for i in order)
    if not spacing_zyx or np.allclose(_xyz(spacing_zyx), spacing):
        return tuple(reversed(size))
    return tuple(reversed(_resampled_size(size, spacing, components, spacing_zyx, max_voxels)))


def resample_spacing(
    image: sitk.Image,
    spacing_zyx: tuple[float, ...] | None,
    max_voxels: int = DEFAULT_LIMITS.max_voxels,
    check_output: Callable[[tuple[int, ...]], None] | None = None,
) -> sitk.Image:
    """Linear resampling to ``spacing_zyx`` (mm), keeping origin and direction; float32 output.

    The output grid is budgeted before anything is allocated: a 2 x 2 x 2 volume declaring 1,000 mm voxels
    would otherwise become 1,000,000,000 voxels at 1 mm (4 GB of float32). ``check_output`` gets the output's
    (z, y, x) size first too, so that a caller can refuse what it would build from it before the resampling runs.
    """
    pixel_type = sitk.sitkVectorFloat32 if image.GetNumberOfComponentsPerPixel() > 1 else sitk.sitkFloat32
    if not spacing_zyx or np.allclose(_xyz(spacing_zyx), image.GetSpacing()):
        if check_output is not None:
            check_output(tuple(reversed(image.GetSize())))
        return sitk.Cast(image, pixel_type)
    components = image.GetNumberOfComponentsPerPixel()
    size = _resampled_size(image.GetSize(), image.GetSpacing(), components, spacing_zyx, max_voxels)
    if check_output is not None:
        check_output(tuple(reversed(size)))
    return sitk.Resample(
        sitk.Cast(image, pixel_type),
        list(size),
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        _xyz(spacing_zyx),
        image.GetDirection(),
        0.0,
        pixel_type,
    )


def _xyz(spacing_zyx: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(s) for s in reversed(spacing_zyx))


def _resampled_size(
    size: tuple[int, ...],
    spacing: tuple[float, ...],
    components: int,
    spacing_zyx: tuple[float, ...],
    max_voxels: int,
) -> tuple[int, ...]:
    """The (x, y, z) size of a grid of ``size`` x ``spacing`` (x, y, z) resampled to ``spacing_zyx``, refused when
    its values (voxels x ``components``) would exceed ``max_voxels``."""
    scaled = np.maximum(1.0, np.rint(np.asarray(size) * np.asarray(spacing) / _xyz(spacing_zyx)))
    if not np.prod(scaled) * components <= max_voxels:  # also refuses inf and nan
        raise LimitExceededError(
            f"the volume of {'x'.join(map(str, reversed(size)))} voxels of "
            f"{'x'.join(f'{s:g}' for s in reversed(spacing))} mm resampled to {spacing_zyx} mm would hold "
            f"{'x'.join(f'{n:g}' for n in reversed(scaled))} voxels, over the limit of {max_voxels}"
        )
    return tuple(int(n) for n in scaled)


def resample_channels(array: np.ndarray, source: Grid, target: Grid, nearest: bool = False) -> np.ndarray:
    """Resample (K, *spatial) values on ``source`` onto ``target`` (linear, or nearest for labels); 0 outside."""
    image = sitk.GetImageFromArray(np.moveaxis(array.astype(np.float32, copy=False), 0, -1), isVector=True)
    image.SetSpacing(source.spacing)
    image.SetOrigin(source.origin)
    image.SetDirection(source.direction)
    out = sitk.Resample(
        image,
        list(target.size),
        sitk.Transform(),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        target.origin,
        target.spacing,
        target.direction,
        0.0,
        sitk.sitkVectorFloat32,
    )
    result = sitk.GetArrayFromImage(out)
    if result.ndim == array.ndim - 1:  # a one-component vector image comes back without its channel axis
        result = result[..., None]
    return np.ascontiguousarray(np.moveaxis(result, -1, 0))
