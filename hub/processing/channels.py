"""Channel policy: turn an image's channels into the model's ``in_channels``, channels first.

``repeat``: grey is copied to ``in_channels`` channels; colour input is kept when the model takes 3 channels,
otherwise turned to grey (ITU-R 601 luma) and copied. ``rgb``: 3 channels in RGB order (grey copied).
``bgr``: as ``rgb`` in reversed order (MedCoSS pathology was trained on cv2's BGR).
"""

from __future__ import annotations

import numpy as np

from hub.errors import InputError

POLICIES = ("repeat", "rgb", "bgr")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def channels_first(array: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(*spatial[, C]) -> (C, *spatial), a view where possible."""
    return array[None] if array.ndim == spatial_dims else np.moveaxis(array, -1, 0)


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
        raise InputError(f"image with {channels} channels cannot feed a model taking {in_channels} channels")
    if policy == "bgr":
        out = out[::-1]
    return np.ascontiguousarray(out, dtype=np.float32)
