"""The preprocessing of a medhub repo as remote code: ``AutoImageProcessor.from_pretrained(repo,
trust_remote_code=True)`` where medhub is not installed.

Every exported repo carries this file and names it in the ``auto_map`` of its ``preprocessor_config.json``.
It is self-contained (numpy, torch, Pillow, transformers) and gives exactly the ``pixel_values`` of medhub's
``MedicalImageProcessor`` for PNG/JPEG (paths or bytes), PIL images and numpy arrays. DICOM, NIfTI, SimpleITK
inputs and 3D resampling need medhub's readers; those raise one line saying so. Where medhub is installed and
imported, transformers picks medhub's own processor (registered at ``import hub``) over this file, even with
``trust_remote_code=True``.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

NEEDS_MEDHUB = (
    "DICOM and NIfTI files, DICOM folders, SimpleITK images and 3D resampling need medhub's readers: "
    "pip install medhub, and import hub before loading the processor"
)
_BOOKKEEPING = ("image_processor_type", "processor_class", "feature_extractor_type", "_from_auto")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"


# Copied from hub.io.raster._BIT_DEPTH
_BIT_DEPTH = {
    "1": 1,
    "L": 8,
    "P": 8,
    "LA": 8,
    "PA": 8,
    "RGB": 8,
    "RGBA": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "I": 32,
    "F": 32,
}

# Copied from hub.processing.intensity._PARAMS
_PARAMS: dict[str, dict[str, Any]] = {
    "scale01": {"bits": None},
    "window": {"low": -1024.0, "high": 1024.0, "divide_by": None},
    "percentile_zscore": {"lower": 0.2, "upper": 99.8},
    "percentile_scale01": {"lower": 2.5, "upper": 97.5},
    "zscore": {},
    "none": {},
}
# Copied from hub.processing.intensity.POLICIES
POLICIES = tuple(_PARAMS)
# Copied from hub.processing.intensity._EPS
_EPS = 1e-8
# Copied from hub.processing.intensity._BLOCK
_BLOCK = 2**20
# Copied from hub.processing.channels._LUMA
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class MedhubInputError(ValueError):
    """An input this processor cannot take (medhub's ``InputError`` where medhub is installed)."""


# ----- reading: PNG/JPEG, PIL and numpy ---------------------------------------------------------------------


def _from_pil(image: Image.Image) -> tuple[np.ndarray, int | None]:
    """(array, bit depth) of a Pillow image, decoded as medhub's ``hub.io.raster.from_pil`` does."""
    mode = image.mode
    if mode not in _BIT_DEPTH:
        raise MedhubInputError(f"PIL image has Pillow mode {mode!r}; expected grey (8/16-bit) or RGB")
    image.load()
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    if image.mode in ("RGBA", "LA"):
        image = image.convert(image.mode[:-1])
    if image.mode in ("CMYK", "YCbCr"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if image.mode == "1":
        array = array.astype(np.uint8)
    elif image.mode.startswith("I;16"):
        array = array.astype(np.uint16)
    return array, _BIT_DEPTH[mode]


def _from_array(array: np.ndarray) -> tuple[np.ndarray, int, int | None]:
    """(array, spatial dims, bit depth) of a numpy input, laid out as medhub's ``hub.io.read.from_array`` does."""
    source = f"array of shape {array.shape}"
    if array.dtype.kind not in "biuf":
        raise MedhubInputError(f"{source} has dtype {array.dtype}; expected integer, boolean or float values")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        if array.ndim == 3:
            array = array[..., :3]
        dims = 2
    elif array.ndim in (3, 4):
        dims = 3
    else:
        raise MedhubInputError(f"{source} is not an image; expected (H, W), (H, W, 3), (D, H, W) or (D, H, W, C)")
    return array, dims, {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(array.dtype)


def _raster(data: bytes | str, source: str) -> tuple[np.ndarray, int | None]:
    if isinstance(data, bytes):
        head = data[:8]
    else:
        with open(data, "rb") as f:
            head = f.read(8)
    if not head.startswith((_PNG_SIGNATURE, _JPEG_SIGNATURE)):
        raise MedhubInputError(f"{source} is not a PNG or JPEG image; {NEEDS_MEDHUB}")
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return _from_pil(image)


def read_input(source: Any) -> tuple[np.ndarray, int, int | None]:
    """(array (*spatial[, C]), spatial dims, bit depth) of a PNG/JPEG path or bytes, a PIL image or a numpy array."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (str, os.PathLike)):
        name = f"file {os.path.basename(os.fspath(source))!r}"
        if not os.path.isfile(source):
            raise MedhubInputError(
                f"{name} does not exist or is a folder; expected a PNG or JPEG file ({NEEDS_MEDHUB})"
            )
        array, bits = _raster(os.fspath(source), name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        array, bits = _raster(bytes(source), "uploaded data")
    elif isinstance(source, Image.Image):
        array, bits = _from_pil(source)
    else:
        raise MedhubInputError(
            f"cannot read an input of type {type(source).__name__}; expected a PNG or JPEG path or "
            f"bytes, a PIL image or a numpy array ({NEEDS_MEDHUB})"
        )
    return array, 2, bits


# ----- the processor's steps (copies of medhub's, checked by tests/test_remote_processor.py) ---------------


# Copied from hub.processing.intensity.normalize_spec
def normalize_spec(spec: dict[str, Any] | str | None) -> dict[str, Any]:
    """Validate an intensity spec and fill in its defaults, so saved configs are explicit."""
    if spec is None:
        spec = {"policy": "none"}
    if isinstance(spec, str):
        spec = {"policy": spec}
    policy = spec.get("policy")
    if policy not in _PARAMS:
        raise ValueError(f"intensity policy {policy!r} is unknown; expected one of {POLICIES}")
    unknown = set(spec) - set(_PARAMS[policy]) - {"policy"}
    if unknown:
        raise ValueError(f"intensity policy {policy!r} takes no parameter(s) {sorted(unknown)}")
    full = {"policy": policy, **_PARAMS[policy], **{k: v for k, v in spec.items() if k != "policy"}}
    if policy == "window" and not full["low"] < full["high"]:
        raise ValueError(f"window needs low < high, got [{full['low']}, {full['high']}]")
    if policy.startswith("percentile") and not 0 <= full["lower"] < full["upper"] <= 100:
        raise ValueError(f"percentiles need 0 <= lower < upper <= 100, got {full['lower']}, {full['upper']}")
    return full


# Copied from hub.processing.intensity.bit_depth_of
def bit_depth_of(array: np.ndarray, declared: int | None) -> int | None:
    if declared:
        return int(declared)
    return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(array.dtype)


# Copied from hub.processing.intensity.apply_intensity
def apply_intensity(array: np.ndarray, spec: dict[str, Any], bits: int | None = None) -> np.ndarray:
    """Apply a normalized spec to ``array`` (``bits``: its stored bit depth, if known); returns float32."""
    policy = spec["policy"]
    bits = bit_depth_of(array, bits)
    x = array.astype(np.float32, copy=False)
    if policy == "none":
        return x
    if policy == "scale01":
        depth = spec["bits"] or bits
        if depth is None:
            return x
        if x is array:
            return x * np.float32(1.0 / (2**depth - 1))
        x *= np.float32(1.0 / (2**depth - 1))  # in the fresh float32 copy: a 7000 x 7000 upload is 196 MB each
        return x
    if policy == "window":
        low, high = float(spec["low"]), float(spec["high"])
        x = np.clip(x, low, high)
        if spec["divide_by"]:
            return x / np.float32(spec["divide_by"])
        return (x - np.float32(low)) * np.float32(1.0 / (high - low))
    if policy == "zscore":
        return _zscore(x)
    low, high = np.percentile(x, [spec["lower"], spec["upper"]])
    x = np.clip(x, low, high)
    if policy == "percentile_zscore":
        return _zscore(x)
    return (x - np.float32(low)) / np.float32(max(high - low, _EPS))


# Copied from hub.processing.intensity._mean_std
def _mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation in float64, two passes over blocks of the flattened values."""
    flat = x.reshape(-1)
    blocks = range(0, flat.size, _BLOCK)
    mean = sum(float(flat[i : i + _BLOCK].sum(dtype=np.float64)) for i in blocks) / flat.size
    squares = 0.0
    for i in blocks:
        deviation = np.subtract(flat[i : i + _BLOCK], mean, dtype=np.float64)
        squares += float(np.dot(deviation, deviation))
    return mean, (squares / flat.size) ** 0.5


# Copied from hub.processing.intensity._zscore
def _zscore(x: np.ndarray) -> np.ndarray:
    mean, std = _mean_std(x)
    out = x - np.float32(mean)
    out /= np.float32(max(std, _EPS))
    return out


# Copied from hub.processing.channels.channels_first
def channels_first(array: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(*spatial[, C]) -> (C, *spatial), a view where possible."""
    return array[None] if array.ndim == spatial_dims else np.moveaxis(array, -1, 0)


# Copied from hub.processing.channels.apply_channels with InputError->MedhubInputError
def apply_channels(array: np.ndarray, policy: str, in_channels: int) -> np.ndarray:
    """(C, *spatial) -> (in_channels, *spatial) float32."""
    channels = array.shape[0]
    if policy in ("rgb", "bgr") and in_channels != 3:
        raise ValueError(f"channel policy {policy!r} needs in_channels=3, got {in_channels}")
    if channels == in_channels:
        out = array
    elif channels == 1:
        out = np.repeat(array, in_channels, axis=0)
    elif channels in (3, 4) and in_channels == 3:
        out = array[:3]
    elif channels in (3, 4):
        out = np.repeat(np.tensordot(_LUMA, array[:3], axes=1)[None], in_channels, axis=0)
    else:
        raise MedhubInputError(f"image with {channels} channels cannot feed a model taking {in_channels} channels")
    if policy == "bgr":
        out = out[::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


# Copied from hub.processing.spatial.resize
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


# Copied from hub.processing.spatial.centre_window
def centre_window(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...]:
    """Start of a centred ``out`` window in ``shape`` (negative where the window pads)."""
    return tuple((s - o) // 2 for s, o in zip(shape, out))


# Copied from hub.processing.spatial._overlap
def _overlap(start: int, out: int, length: int) -> tuple[slice, slice]:
    lo, hi = max(start, 0), min(start + out, length)
    return slice(lo, hi), slice(lo - start, hi - start)


# Copied from hub.processing.spatial.crop_pad
def crop_pad(array: np.ndarray, out: tuple[int, ...], starts: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """Take the window of size ``out`` starting at ``starts`` from (C, *spatial); outside is ``fill``."""
    result = np.full((array.shape[0], *out), fill, dtype=array.dtype)
    src, dst = zip(*(_overlap(s, o, n) for s, o, n in zip(starts, out, array.shape[1:])))
    result[(slice(None),) + dst] = array[(slice(None),) + src]
    return result


# Copied from hub.processing.processor._int_list
def _int_list(value: Sequence[int] | int | None, n: int, name: str) -> list[int] | None:
    if value is None:
        return None
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n or min(values) < 1:
        raise ValueError(f"{name} must hold {n} positive integers (numpy order), got {value}")
    return values


# Copied from hub.processing.processor._float_list
def _float_list(value: Sequence[float] | float | None, n: set[int], name: str) -> list[float] | None:
    if value is None:
        return None
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in n:
        raise ValueError(f"{name} must hold {' or '.join(map(str, sorted(set(n))))} values, got {value}")
    return values


# Copied from hub.processing.processor._resized
def _resized(logits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(K, *spatial) logits resized (bi/trilinearly) to ``shape``."""
    if tuple(logits.shape[1:]) == tuple(shape):
        return logits
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(logits[None], size=shape, mode=mode, align_corners=False)[0]


# ----- the processor ---------------------------------------------------------------------------------------


class MedicalImageProcessor(BaseImageProcessor):
    """medhub's ``MedicalImageProcessor`` for PNG/JPEG/PIL/numpy inputs, without medhub.

    Takes the settings of ``preprocessor_config.json`` (sizes in numpy order) and saves them back unchanged.
    """

    model_input_names = ["pixel_values"]
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
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if (image_mean is None) != (image_std is None):
            raise ValueError("image_mean and image_std must be given together")
        self.modality = modality
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.channel_policy = channel_policy
        self.invert_monochrome1 = bool(invert_monochrome1)
        self.intensity = normalize_spec(intensity)
        self.image_mean = _float_list(image_mean, {1, self.in_channels}, "image_mean")
        self.image_std = _float_list(image_std, {1, self.in_channels}, "image_std")
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

    def to_dict(self) -> dict[str, Any]:
        """The declarative settings, as medhub's processor writes them (so either loads what the other saved)."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in self._FIELDS}
        out["image_processor_type"] = type(self).__name__
        if getattr(self, "auto_map", None) is not None:
            out["auto_map"] = copy.deepcopy(self.auto_map)
        return out

    def _values(self, source: Any) -> np.ndarray:
        """Read, check dimensionality and grid, apply the intensity policy: (source channels, *spatial) float32."""
        array, dims, bits = read_input(source)
        if dims != self.spatial_dims:
            kind = "2D image" if dims == 2 else "3D volume"
            raise MedhubInputError(
                f"this model takes {self.spatial_dims}D input but got a {kind} of shape {array.shape}"
            )
        if dims == 3 and (self.orientation is not None or self.target_spacing is not None):
            if self.orientation is not None or not np.allclose(self.target_spacing, 1.0):
                raise MedhubInputError(
                    f"this model resamples volumes to {self.target_spacing} mm"
                    f"{'' if self.orientation is None else ' in ' + self.orientation}; {NEEDS_MEDHUB}"
                )
            array = array.astype(np.float32)  # a numpy volume's 1 mm grid already is the target grid
        bits = bit_depth_of(array, bits)
        return channels_first(apply_intensity(array, self.intensity, bits), self.spatial_dims)

    def _pixel_values(self, source: Any) -> np.ndarray:
        values = self._values(source)
        if self.resize:
            values = resize(values, tuple(self.resize))
        values = apply_channels(values, self.channel_policy, self.in_channels)
        if self.image_mean is not None:
            shape = (-1,) + (1,) * self.spatial_dims
            mean = np.asarray(self.image_mean, dtype=np.float32).reshape(shape)
            std = np.asarray(self.image_std, dtype=np.float32).reshape(shape)
            values = (values - mean) / std
        starts = centre_window(tuple(values.shape[1:]), tuple(self.size))
        return crop_pad(values, tuple(self.size), starts)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """One input or a list of inputs -> ``pixel_values`` (B, C, *size) float32."""
        if kwargs:
            raise TypeError(f"MedicalImageProcessor got unexpected argument(s) {sorted(kwargs)}")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise MedhubInputError("no images given; expected at least one")
        data = {"pixel_values": np.stack([self._pixel_values(item) for item in batch])}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[Any] | None = None
    ) -> list[torch.Tensor]:
        """Label maps from ``logits`` (B, K, *spatial), each resized to its ``target_sizes`` entry when given."""
        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs.logits).detach().float().cpu()
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"target_sizes holds {len(target_sizes)} entries for a batch of {len(logits)}")
        maps = []
        for i, item in enumerate(logits):
            if target_sizes is not None and target_sizes[i] is not None:
                item = _resized(item, tuple(int(n) for n in target_sizes[i]))
            maps.append(item.argmax(0))
        return maps
