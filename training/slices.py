"""Slices and sub-volumes of CT/MRI volumes with their relative position, and MACL's four views of either.

2D: a volume manifest row (NIfTI file or DICOM series) becomes one sample per axial slice; every slice goes
through the variant's 2D `MedicalImageProcessor` (the same preprocessing the exported model gets at inference)
and carries p = (slice index + 1) / (slices in the volume), the quantity MACL's positives are defined by.
3D (medhub's extension): the variant's 3D processor prepares the whole volume (`prepare_whole`: intensity and
channels as at inference, no crop) and every start along the slice axis gives one sub-volume of the crop's
depth, carrying p = (centre slice index + 1) / (slices in the volume) with centre = start + depth // 2; the
in-plane window is drawn per sample (`random_window`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from hub.errors import InputError
from hub.io import read_image
from hub.processing import spatial
from hub.processing.processor import MedicalImageProcessor

from .data import ManifestRows
from .errors import TrainingConfigError


class SliceDataset(Dataset):
    """Every axial slice of every volume of `rows`: (1, H, W) pixel values and the relative slice position."""

    def __init__(self, rows: ManifestRows, processor: MedicalImageProcessor):
        if processor.spatial_dims != 2:
            raise TrainingConfigError("slice datasets need a 2D processor (a 2D MACL variant)")
        self.processor = processor
        self.pixels: list[torch.Tensor] = []
        self.positions: list[float] = []
        self.volumes: list[int] = []
        for volume, (number, row) in enumerate(rows.rows):
            image_path, _ = row.resolve(rows.root)
            image = read_image(image_path)
            if image.spatial_dims != 3:
                raise TrainingConfigError(
                    f"manifest {rows.name!r} row {number}: {row.path} is a 2D image; slice datasets need volumes"
                )
            array = image.array if image.array.ndim == 3 else image.array[..., 0]
            depth = array.shape[0]
            for index in range(depth):
                prepared = processor.prepare(np.ascontiguousarray(array[index], dtype=np.float32))
                self.pixels.append(torch.from_numpy(prepared.pixel_values))
                self.positions.append((index + 1) / depth)
                self.volumes.append(volume)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        return self.pixels[index], self.positions[index]


class SubVolumeDataset(Dataset):
    """Every sub-volume start along the slice axis of every volume of `rows`: (C, depth, H, W) pixel values (the
    volume's full plane; `random_window` cuts the in-plane crop) and the relative position of the centre slice.

    A volume with fewer slices than `depth` gives one sub-volume, zero-padded on both ends like the processor's
    centred crop/pad (padding is 0 after normalisation)."""

    def __init__(self, rows: ManifestRows, processor: MedicalImageProcessor, depth: int):
        if processor.spatial_dims != 3:
            raise TrainingConfigError("sub-volume datasets need a 3D processor (a 3D MACL variant)")
        self.depth = depth
        self.volumes: list[torch.Tensor] = []
        self.starts: list[tuple[int, int]] = []
        self.positions: list[float] = []
        for volume, (number, row) in enumerate(rows.rows):
            image_path, _ = row.resolve(rows.root)
            try:
                values = processor.prepare_whole(image_path).pixel_values
            except InputError as error:
                raise TrainingConfigError(f"manifest {rows.name!r} row {number}: {row.path}: {error}") from None
            self.volumes.append(torch.from_numpy(values))
            slices = values.shape[1]
            starts = range(slices - depth + 1) if slices >= depth else [(slices - depth) // 2]
            for start in starts:
                self.starts.append((volume, start))
                self.positions.append((start + depth // 2 + 1) / slices)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        volume, start = self.starts[index]
        values = self.volumes[volume]
        window = (self.depth, *values.shape[2:])
        return torch.from_numpy(spatial.crop_pad(values.numpy(), window, (start, 0, 0))), self.positions[index]


def random_window(values: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A (C, D, *size) window of (C, D, H, W): a uniform random start on each in-plane axis longer than the window,
    centred zero padding on the shorter ones."""
    starts = [0]
    for length, side in zip(values.shape[2:], size):
        if length > side:
            starts.append(int(torch.randint(length - side + 1, (), generator=generator)))
        else:
            starts.append((length - side) // 2)
    return torch.from_numpy(spatial.crop_pad(values.numpy(), (values.shape[1], *size), tuple(starts)))


ELASTIC_3D = (
    "views.elastic is 2D only (no elastic deformation of sub-volumes); set views.elastic: false for 3D variants"
)


@dataclass
class ViewSettings:
    """MACL's views. `photometric`: "code" (the released code: brightness factor U[0, 1], contrast U[0.8, 1.2],
    Gaussian blur 3x3 with sigma U[1, 3], each view independently) or "identity" (the paper, Sec. IV-B). The
    spatial pair mirrors every axis (p 0.5 each), then with `spatial_prob` rotates by U[0, 2 pi], scales by
    U[`scale`] and, when `elastic` (the code; the paper lists no elastic step), deforms with a Gaussian-smoothed
    random field (alpha, sigma in pixels at the input size).

    Sub-volumes (3D) get the same draws with three differences: the blur is in-plane (slice by slice, as the 2D
    recipe blurs a slice), the rotation turns every slice alike about the slice axis (so the slice axis, which
    positions are measured along, stays put) while the scale is isotropic, and there is no elastic deformation
    (`elastic` must be false)."""

    photometric: str = "code"
    brightness: list[float] = field(default_factory=lambda: [0.0, 1.0])
    contrast: list[float] = field(default_factory=lambda: [0.8, 1.2])
    blur_sigma: list[float] = field(default_factory=lambda: [1.0, 3.0])
    spatial_prob: float = 0.67
    rotation: bool = True
    scale: list[float] = field(default_factory=lambda: [0.7, 1.3])
    elastic: bool = True
    elastic_alpha: list[float] = field(default_factory=lambda: [100.0, 350.0])
    elastic_sigma: list[float] = field(default_factory=lambda: [14.0, 17.0])

    def __post_init__(self) -> None:
        if self.photometric not in ("code", "identity"):
            raise TrainingConfigError(f"views.photometric {self.photometric!r} is not one of code, identity")
        if not 0.0 <= self.spatial_prob <= 1.0:
            raise TrainingConfigError(f"views.spatial_prob must be in [0, 1], got {self.spatial_prob}")


def _uniform(generator: torch.Generator, bounds: list[float]) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator))


def min_max(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low).clamp(min=1e-8)


def standardise(values: torch.Tensor) -> torch.Tensor:
    """Back to the processor's z-scored range, so pretraining inputs look like the exported model's inputs."""
    return (values - values.mean()) / values.std(unbiased=False).clamp(min=1e-8)


def _gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def _blur(values: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Separable Gaussian blur of (..., H, W) over the last two axes (every leading index alone), reflect padding."""
    kernel = _gaussian_kernel(sigma, size)
    pad = size // 2
    planes = values.reshape(-1, 1, *values.shape[-2:])
    planes = F.conv2d(F.pad(planes, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))
    return planes.reshape(values.shape)


def photometric_view(values: torch.Tensor, settings: ViewSettings, generator: torch.Generator) -> torch.Tensor:
    """A view I of a (C, H, W) slice or (C, D, H, W) sub-volume in [0, 1] (min-max rescaled), as the code's
    torchvision chain makes it (blur in-plane)."""
    values = min_max(values)
    if settings.photometric == "identity":
        return values
    values = (values * _uniform(generator, settings.brightness)).clamp(0, 1)
    contrast = _uniform(generator, settings.contrast)
    values = (contrast * values + (1 - contrast) * values.mean()).clamp(0, 1)
    return min_max(_blur(values, _uniform(generator, settings.blur_sigma), 3))


def spatial_view(values: torch.Tensor, settings: ViewSettings, generator: torch.Generator) -> torch.Tensor:
    """A view V of a (C, H, W) or (C, D, H, W) photometric view: mirrors, then (with `spatial_prob`) rotation
    (in-plane), scale and (2D only) elastic deformation."""
    volume = values.ndim == 4
    if volume and settings.elastic:
        raise TrainingConfigError(ELASTIC_3D)
    for axis in range(-1, -values.ndim, -1):
        if float(torch.rand((), generator=generator)) < 0.5:
            values = values.flip(axis)
    if float(torch.rand((), generator=generator)) >= settings.spatial_prob:
        return values
    angle = _uniform(generator, [0.0, 2 * math.pi]) if settings.rotation else 0.0
    zoom = _uniform(generator, settings.scale)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    if volume:  # grid rows are (x, y, z) = (W, H, D): turn the H-W plane, scale all three axes
        theta = torch.tensor([[[cos, -sin, 0.0, 0.0], [sin, cos, 0.0, 0.0], [0.0, 0.0, 1 / zoom, 0.0]]])
        grid = F.affine_grid(theta, [1, *values.shape], align_corners=False)
        return F.grid_sample(values[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    height, width = values.shape[-2:]
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
    grid = F.affine_grid(theta, [1, values.shape[0], height, width], align_corners=False)
    if settings.elastic:
        alpha, sigma = _uniform(generator, settings.elastic_alpha), _uniform(generator, settings.elastic_sigma)
        field_ = torch.rand((2, height, width), generator=generator) * 2 - 1
        size = 2 * int(math.ceil(3 * sigma)) + 1
        size = min(size, 2 * (min(height, width) // 2) - 1)
        field_ = _blur(field_, sigma, size) * alpha
        # pixels -> normalised grid units (x then y, as grid_sample reads them)
        grid = grid + torch.stack([field_[0] * 2 / width, field_[1] * 2 / height], dim=-1)[None]
    return F.grid_sample(values[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def macl_views(values: torch.Tensor, settings: ViewSettings, generators: list[torch.Generator]) -> list[torch.Tensor]:
    """[I1, I2, V1, V2] of one slice or sub-volume, each standardised: I1/V1 feed the auxiliary branch, I2/V2 the
    dominant one (the model down-samples those). Four generators: one per view draw, so every view is reproducible
    alone."""
    first = photometric_view(values, settings, generators[0])
    second = photometric_view(values, settings, generators[1])
    views = [first, second, spatial_view(first, settings, generators[2]), spatial_view(second, settings, generators[3])]
    return [standardise(view) for view in views]
