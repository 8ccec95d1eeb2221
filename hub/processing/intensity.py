"""Intensity policies of ``preprocessor_config.json`` (declarative dicts, never code).

``{"policy": "scale01", "bits": null}``  value / (2**bits - 1); bits default to the image's stored bit depth
    (8 for uint8, 16 for uint16); float input of unknown depth is taken as already in [0, 1].
``{"policy": "window", "low": -1024, "high": 1024, "divide_by": null}``  clip to [low, high], then map to
    [0, 1], or divide by ``divide_by`` when given (MedCoSS CT: clip +-1024, / 1024 -> [-1, 1]).
``{"policy": "percentile_zscore", "lower": 0.2, "upper": 99.8}``  clip to the image's percentiles, z-score.
``{"policy": "percentile_scale01", "lower": 2.5, "upper": 97.5}``  map the percentile range to [0, 1], clipped.
``{"policy": "zscore"}``  subtract the image's mean, divide by its standard deviation.
``{"policy": "none"}``  values as read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hub.io.image import MONOCHROME1

_PARAMS: dict[str, dict[str, Any]] = {
    "scale01": {"bits": None},
    "window": {"low": -1024.0, "high": 1024.0, "divide_by": None},
    "percentile_zscore": {"lower": 0.2, "upper": 99.8},
    "percentile_scale01": {"lower": 2.5, "upper": 97.5},
    "zscore": {},
    "none": {},
}
POLICIES = tuple(_PARAMS)
_EPS = 1e-8


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


def bit_depth_of(array: np.ndarray, declared: int | None) -> int | None:
    if declared:
        return int(declared)
    return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(array.dtype)


def to_monochrome2(array: np.ndarray, photometric: str, bits: int | None) -> np.ndarray:
    """Invert MONOCHROME1 values (bright = air) to MONOCHROME2 meaning: (2**bits - 1) - v, or max + min - v."""
    if photometric != MONOCHROME1:
        return array
    array = array.astype(np.float32)
    top = float(2**bits - 1) if bits else float(array.max() + array.min())
    return top - array


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


_BLOCK = 2**20
"""Values per block of the float64 statistics: ``x.std(dtype=float64)`` would make a float64 copy of the
whole volume (2 GiB for a 512 x 512 x 1024 CT that a 522 KB .nii.gz can declare)."""


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


def _zscore(x: np.ndarray) -> np.ndarray:
    mean, std = _mean_std(x)
    out = x - np.float32(mean)
    out /= np.float32(max(std, _EPS))
    return out
