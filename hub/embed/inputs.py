"""What the encoder sees for one input, and how its outputs become one embedding: the one definition that the
torch backend, the ONNX export and the HTTP service share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hub.io import ReadLimits
from hub.processing import MedicalImageProcessor


def model_inputs(processor: MedicalImageProcessor, source: Any, limits: ReadLimits | None = None) -> np.ndarray:
    """(N, C, *size) float32: the preprocessed image (N = 1), or for a 3D processor without ``resize`` the
    volume's sliding-window tiles, as in :meth:`MedicalImageProcessor.predict`."""
    if processor.tiles_volumes:
        return processor.tile(source, limits).tiles
    return processor.prepare(source, limits).pixel_values[None]


def pool_tiles(outputs: np.ndarray) -> np.ndarray:
    """One input's embedding from its tiles' pooled outputs (N, D): their mean (the identity for N = 1)."""
    return outputs[0] if len(outputs) == 1 else outputs.mean(axis=0, dtype=np.float64).astype(np.float32)


def pool_hidden_state(hidden: torch.Tensor) -> torch.Tensor:
    """Mean over tokens for (B, N, C) sequences, over space for (B, C, *spatial) maps."""
    return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)
