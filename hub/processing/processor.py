"""``MedicalImageProcessor``: the declarative preprocessing every medhub repo ships (docs/architecture.md).

Pipeline per image: read (any :func:`hub.io.read_image` source) -> [3D: reorient, resample to
``target_spacing``] -> MONOCHROME1 inversion -> intensity policy -> [``resize``] -> channel policy ->
``image_mean``/``image_std`` -> centre crop/pad to ``size`` (padding is 0 after normalisation). Every spatial step
is recorded so model outputs can be mapped back onto the input's grid (:meth:`restore`, :meth:`stitch`,
:meth:`predict`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from hub.errors import InputError
from hub.io import DEFAULT_LIMITS, MedicalImage, ReadLimits, read_image
from hub.io.declared import DeclaredVolume
from hub.processing import channels, spatial, tiling
from hub.processing import intensity as policies
from hub.processing.spatial import Grid

MODALITIES = ("xray", "ct", "mri", "pathology")
_BOOKKEEPING = ("image_processor_type", "processor_class", "feature_extractor_type", "_from_auto")


class MedicalImageProcessorKwargs(TypedDict, total=False):
    modality: str
    spatial_dims: int
    in_channels: int
    channel_policy: str
    invert_monochrome1: bool
    intensity: dict
    image_mean: list
    image_std: list
    resize: list
    size: list
    target_spacing: list
    orientation: str
    tile_overlap: float
    tile_weighting: str


@dataclass
class SpatialRecord:
    """What the spatial steps did to one image, enough to map outputs back onto the input grid."""

    input_shape: tuple[int, ...]
    input_grid: Grid | None
    """Input grid, set only when 3D resampling/reorientation changed it."""
    processed_grid: Grid | None
    base_shape: tuple[int, ...]
    """Spatial shape after resampling, before resize."""
    resized_shape: tuple[int, ...] | None
    starts: tuple[int, ...]
    """Start of the crop/pad window in the (resized) image."""
    output_shape: tuple[int, ...]


@dataclass
class Prepared:
    pixel_values: np.ndarray
    """(C, *size) float32."""
    record: SpatialRecord
    image: MedicalImage
    """The image as read, for writing results in its geometry."""


@dataclass
class Tiled:
    tiles: np.ndarray
    """(N, C, *size) float32."""
    plan: tiling.TilingPlan
    record: SpatialRecord
    image: MedicalImage


def _int_list(value: Sequence[int] | int | None, n: int, name: str) -> list[int] | None:
    if value is None:
        return None
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n or min(values) < 1:
        raise ValueError(f"{name} must hold {n} positive integers (numpy order), got {value}")
    return values


def _float_list(value: Sequence[float] | float | None, n: set[int], name: str) -> list[float] | None:
    if value is None:
        return None
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in n:
        raise ValueError(f"{name} must hold {' or '.join(map(str, sorted(set(n))))} values, got {value}")
    return values


class MedicalImageProcessor(BaseImageProcessor):
    """Reads PNG/JPEG/DICOM/NIfTI (paths, bytes, PIL, numpy, SimpleITK) and returns ``pixel_values``.

    All constructor arguments are plain JSON values and are saved verbatim in ``preprocessor_config.json``.
    Sizes are in numpy order: ``size``/``resize`` as (H, W) or (D, H, W), ``target_spacing`` in mm as (z, y, x).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = MedicalImageProcessorKwargs

    def __init__(
        self,
        modality: str = "xray",
        spatial_dims: int = 2,
        in_channels: int = 3,
        channel_policy: str = "repeat",
        invert_monochrome1: bool = True,
        intensity: dict[str, Any] | str | None = "scale01",
        image_mean: Sequence[float] | float | None = None,
        image_std: Sequence[float] | float | None = None,
        resize: Sequence[int] | int | None = None,
        size: Sequence[int] | int = 224,
        target_spacing: Sequence[float] | float | None = None,
        orientation: str | None = None,
        tile_overlap: float = 0.5,
        tile_weighting: str = "gaussian",
        **kwargs: Any,
    ) -> None:
        auto_map = kwargs.pop("auto_map", None)
        unknown = set(kwargs) - set(_BOOKKEEPING)
        if unknown:
            raise ValueError(f"MedicalImageProcessor got unknown setting(s) {sorted(unknown)}")
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r} is unknown; expected one of {MODALITIES}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if channel_policy not in channels.POLICIES:
            raise ValueError(f"channel_policy {channel_policy!r} is unknown; expected one of {channels.POLICIES}")
        if channel_policy in ("rgb", "bgr") and in_channels != 3:
            raise ValueError(f"channel_policy {channel_policy!r} needs in_channels=3, got {in_channels}")
        if spatial_dims == 2 and (target_spacing is not None or orientation is not None):
            raise ValueError("target_spacing and orientation apply to 3D processors only")
        if (image_mean is None) != (image_std is None):
            raise ValueError("image_mean and image_std must be given together")
        if tile_weighting not in tiling.WEIGHTINGS:
            raise ValueError(f"tile_weighting {tile_weighting!r} is unknown; expected one of {tiling.WEIGHTINGS}")
        if not 0.0 <= float(tile_overlap) < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.modality = modality
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.channel_policy = channel_policy
        self.invert_monochrome1 = bool(invert_monochrome1)
        self.intensity = policies.normalize_spec(intensity)
        self.image_mean = _float_list(image_mean, {1, self.in_channels}, "image_mean")
        self.image_std = _float_list(image_std, {1, self.in_channels}, "image_std")
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        self.resize = _int_list(resize, self.spatial_dims, "resize")
        self.size = _int_list(size, self.spatial_dims, "size")
        if isinstance(target_spacing, (int, float)):
            target_spacing = [target_spacing] * 3
        self.target_spacing = _float_list(target_spacing, {3}, "target_spacing")
        self.orientation = orientation
        self.tile_overlap = float(tile_overlap)
        self.tile_weighting = tile_weighting
        if auto_map is not None:
            self.auto_map = auto_map

    _FIELDS = (
        "modality",
        "spatial_dims",
        "in_channels",
        "channel_policy",
        "invert_monochrome1",
        "intensity",
        "image_mean",
        "image_std",
        "resize",
        "size",
        "target_spacing",
        "orientation",
        "tile_overlap",
        "tile_weighting",
    )

    def to_dict(self) -> dict[str, Any]:
        """Exactly the declarative settings (plus ``image_processor_type``), so save -> load is lossless."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in self._FIELDS}
        out["image_processor_type"] = type(self).__name__
        if getattr(self, "auto_map", None) is not None:
            out["auto_map"] = copy.deepcopy(self.auto_map)
        return out

    # ----- per-image steps -------------------------------------------------------------------------------

    @property
    def tiles_volumes(self) -> bool:
        """Whether 3D inputs go through sliding-window tiles (there is no ``resize``) in :meth:`predict` and in
        :func:`hub.embed.model_inputs`."""
        return self.spatial_dims == 3 and self.resize is None

    def check_declared(self, declared: DeclaredVolume, limits: ReadLimits | None = None, tiled: bool = False) -> None:
        """Refuse, from a volume's header alone, what this processor would refuse once it is decoded: its resampled
        voxels or its float32 copy over ``limits``, and with ``tiled`` its sliding-window tiles. The ``inspect``
        callback of :func:`hub.io.read_image`, so that a small upload declaring a huge volume costs milliseconds
        rather than the seconds of inflating and decoding it."""
        if self.spatial_dims != 3:
            return
        limits = limits or DEFAULT_LIMITS
        try:
            shape = spatial.planned_size(
                declared.size,
                declared.spacing,
                declared.direction,
                self.orientation,
                self.target_spacing,
                declared.channels,
                limits.max_voxels,
            )
        except RuntimeError:  # SimpleITK refused the declared direction; the decoder will say what is wrong
            return
        self._check_float_copy(shape + ((declared.channels,) if declared.channels > 1 else ()), limits)
        if tiled:
            self._check_tiles(shape, limits)

    def _read(self, source: Any, limits: ReadLimits | None, tiled: bool = False) -> MedicalImage:
        image = read_image(source, limits, lambda declared: self.check_declared(declared, limits, tiled))
        if image.spatial_dims != self.spatial_dims:
            kind = "2D image" if image.spatial_dims == 2 else "3D volume"
            raise InputError(
                f"this model takes {self.spatial_dims}D input but got a {kind} of shape {image.array.shape}"
            )
        return image

    def _resampled(
        self,
        image: MedicalImage,
        limits: ReadLimits | None,
        check_output: Callable[[tuple[int, ...]], None] | None = None,
    ) -> tuple[MedicalImage, Grid | None, Grid | None]:
        if self.spatial_dims == 2 or (self.target_spacing is None and self.orientation is None):
            if check_output is not None:
                check_output(image.spatial_shape)
            return image, None, None
        source = image.to_sitk()
        moved = spatial.resample_spacing(
            spatial.reorient(source, self.orientation),
            self.target_spacing,
            (limits or DEFAULT_LIMITS).max_voxels,
            check_output,
        )
        after = MedicalImage.from_sitk(
            moved,
            keep_volume=True,
            modality=image.modality,
            photometric=image.photometric,
            bit_depth=image.bit_depth,
            meta=dict(image.meta),
        )
        return after, Grid.of(source), Grid.of(moved)

    def _values(self, image: MedicalImage, limits: ReadLimits | None = None) -> np.ndarray:
        """Photometric and intensity steps: returns (source channels, *spatial) float32."""
        if self.spatial_dims == 3:
            self._check_float_copy(image.array.shape, limits or DEFAULT_LIMITS)
        bits = policies.bit_depth_of(image.array, image.bit_depth)
        array = image.array
        if self.invert_monochrome1:
            array = policies.to_monochrome2(array, image.photometric, bits)
        array = policies.apply_intensity(array, self.intensity, bits)
        return channels.channels_first(array, self.spatial_dims)

    @staticmethod
    def _check_float_copy(shape: tuple[int, ...], limits: ReadLimits) -> None:
        limits.check_array(shape, 4, f"the float32 copy of a {shape} volume")

    def _check_tiles(self, shape: tuple[int, ...], limits: ReadLimits) -> None:
        count = tiling.count_tiles(shape, tuple(self.size), self.tile_overlap)
        limits.check_array((count, self.in_channels, *self.size), 4, f"the sliding-window tiles of a {shape} volume")

    def _model_channels(self, values: np.ndarray) -> np.ndarray:
        """Channel policy, then ``image_mean``/``image_std``; done after resizing, on the fewest pixels."""
        values = channels.apply_channels(values, self.channel_policy, self.in_channels)
        if self.image_mean is not None:
            shape = (-1,) + (1,) * self.spatial_dims
            mean = np.asarray(self.image_mean, dtype=np.float32).reshape(shape)
            std = np.asarray(self.image_std, dtype=np.float32).reshape(shape)
            values = (values - mean) / std
        return values

    def prepare(self, source: Any, limits: ReadLimits | None = None) -> Prepared:
        """Preprocess one input to the model's input size, recording how to map outputs back."""
        image = self._read(source, limits)
        moved, input_grid, processed_grid = self._resampled(image, limits)
        values = self._values(moved, limits)
        base = tuple(values.shape[1:])
        resized = tuple(self.resize) if self.resize else None
        if resized:
            values = spatial.resize(values, resized)
        values = self._model_channels(values)
        starts = spatial.centre_window(tuple(values.shape[1:]), tuple(self.size))
        values = spatial.crop_pad(values, tuple(self.size), starts)
        record = SpatialRecord(image.spatial_shape, input_grid, processed_grid, base, resized, starts, tuple(self.size))
        return Prepared(values, record, image)

    def prepare_whole(self, source: Any, limits: ReadLimits | None = None) -> Prepared:
        """The whole input after resampling, intensity, channel and mean/std steps, with no ``resize`` and no
        crop/pad to ``size``: what :meth:`tile` cuts, and what training crops its own windows from."""
        image = self._read(source, limits)
        return self._whole(image, *self._resampled(image, limits), limits)

    def _whole(
        self,
        image: MedicalImage,
        moved: MedicalImage,
        input_grid: Grid | None,
        processed_grid: Grid | None,
        limits: ReadLimits | None,
    ) -> Prepared:
        values = self._model_channels(self._values(moved, limits))
        base = tuple(values.shape[1:])
        record = SpatialRecord(image.spatial_shape, input_grid, processed_grid, base, None, (0,) * len(base), base)
        return Prepared(values, record, image)

    def tile(self, source: Any, limits: ReadLimits | None = None) -> Tiled:
        """Cut a (resampled, normalised) volume into overlapping ``size`` tiles for sliding-window inference; the
        tiles' bytes are checked against ``limits.max_array_bytes`` before the intensity steps or the tiles run (from
        the header, before decoding, where the reader can tell the volume's grid from it)."""
        image = self._read(source, limits, tiled=True)
        check_tiles = partial(self._check_tiles, limits=limits or DEFAULT_LIMITS)  # told the size before resampling
        moved, input_grid, processed_grid = self._resampled(image, limits, check_tiles)
        plan = tiling.plan_tiles(moved.spatial_shape, tuple(self.size), self.tile_overlap)
        whole = self._whole(image, moved, input_grid, processed_grid, limits)
        return Tiled(tiling.extract_tiles(whole.pixel_values, plan), plan, whole.record, whole.image)

    def restore(self, outputs: np.ndarray, record: SpatialRecord) -> np.ndarray:
        """Map per-voxel outputs (K, *output_shape), e.g. logits, back onto the input grid: (K, *input_shape).

        Regions that the crop cut away come back as 0; outputs are interpolated linearly.
        """
        outputs = np.asarray(outputs, dtype=np.float32)
        if tuple(outputs.shape[1:]) != record.output_shape:
            raise InputError(f"outputs of shape {outputs.shape} do not match the model input {record.output_shape}")
        values = spatial.uncrop_pad(outputs, record.resized_shape or record.base_shape, record.starts)
        if record.resized_shape:
            values = spatial.resize(values, record.base_shape)
        if record.processed_grid is not None:
            values = spatial.resample_channels(values, record.processed_grid, record.input_grid)
        return values

    def stitch(self, tile_outputs: np.ndarray, tiled: Tiled) -> np.ndarray:
        """Blend per-tile outputs (N, K, *size) and map them back onto the input grid: (K, *input_shape)."""
        blended = tiling.stitch_tiles(np.asarray(tile_outputs), tiled.plan, self.tile_weighting)
        return self.restore(blended, tiled.record)

    def predict(
        self,
        source: Any,
        model: Callable[[np.ndarray], np.ndarray],
        batch_size: int = 2,
        limits: ReadLimits | None = None,
    ) -> tuple[np.ndarray, MedicalImage]:
        """Run a dense model (B, C, *size) -> (B, K, *size) over ``source``; logits come back on the input grid.

        3D volumes larger than ``size`` (and not resized) go through sliding-window tiling.
        Returns (logits (K, *input_shape), the image as read).
        """
        if self.tiles_volumes:
            tiled = self.tile(source, limits)
            outputs = [model(tiled.tiles[i : i + batch_size]) for i in range(0, len(tiled.tiles), batch_size)]
            return self.stitch(np.concatenate(outputs), tiled), tiled.image
        prepared = self.prepare(source, limits)
        return self.restore(model(prepared.pixel_values[None])[0], prepared.record), prepared.image

    # ----- transformers entry points ---------------------------------------------------------------------

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        return_geometry: bool = False,
        limits: ReadLimits | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess one input or a list of inputs into ``pixel_values`` (B, C, *size) float32.

        With ``return_geometry`` the result also holds ``records`` and ``images`` (one per input) for
        :meth:`restore` and the mask writers.
        """
        if kwargs:
            raise TypeError(f"MedicalImageProcessor got unexpected argument(s) {sorted(kwargs)}")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("no images given; expected at least one")
        prepared = [self.prepare(item, limits) for item in batch]
        data: dict[str, Any] = {"pixel_values": np.stack([p.pixel_values for p in prepared])}
        skip = None
        if return_geometry:
            data["records"] = [p.record for p in prepared]
            data["images"] = [p.image for p in prepared]
            skip = ["records", "images"]
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=skip)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[Any] | None = None
    ) -> list[torch.Tensor]:
        """Label maps from a segmentation head's ``logits`` (B, K, *spatial), as transformers' processors give.

        Each ``target_sizes`` entry is a :class:`SpatialRecord` (from ``return_geometry=True``: the map comes back
        on the input's grid through :meth:`restore`), a spatial size (logits resized to it), or ``None``.
        """
        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs.logits).detach().float().cpu()
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"target_sizes holds {len(target_sizes)} entries for a batch of {len(logits)}")
        maps = []
        for i, item in enumerate(logits):
            target = None if target_sizes is None else target_sizes[i]
            if isinstance(target, SpatialRecord):
                item = torch.from_numpy(self.restore(_resized(item, target.output_shape).numpy(), target))
            elif target is not None:
                item = _resized(item, tuple(int(n) for n in target))
            maps.append(item.argmax(0))
        return maps


def _resized(logits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(K, *spatial) logits resized (bi/trilinearly) to ``shape``."""
    if tuple(logits.shape[1:]) == tuple(shape):
        return logits
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(logits[None], size=shape, mode=mode, align_corners=False)[0]
