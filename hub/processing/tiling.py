"""Sliding-window tiling of volumes larger than the model input, and its inverse (weighted stitching).

Stitching accumulates in float64 and divides by the summed weights, so tiles that all carry the same value
for a voxel give back exactly that float32 value: tiling then stitching with an identity model is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

WEIGHTINGS = ("gaussian", "constant")


@dataclass(frozen=True)
class TilingPlan:
    """Where the tiles of a volume lie: ``starts`` index the volume end-padded to ``padded``."""

    shape: tuple[int, ...]
    patch: tuple[int, ...]
    padded: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.starts)


def _axis_range(length: int, patch: int, overlap: float) -> range:
    """The regular starts along one axis; a last tile ending at ``length`` is added where they stop short of it."""
    return range(0, length - patch + 1, max(1, int(patch * (1.0 - overlap))))


def _axis_starts(length: int, patch: int, overlap: float) -> list[int]:
    starts = list(_axis_range(length, patch, overlap))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def count_tiles(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float = 0.5) -> int:
    """``len(plan_tiles(shape, patch, overlap))`` without building the plan: a budget check must not first list
    millions of tile starts (a 1 x 32767 x 2400 volume in 8^3 tiles has 4.9 million)."""
    count = 1
    for length, p in zip(_padded(shape, patch, overlap), patch):
        starts = _axis_range(length, p, overlap)  # a range's length is arithmetic: nothing is listed
        count *= len(starts) + (starts[-1] != length - p)
    return count


def plan_tiles(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float = 0.5) -> TilingPlan:
    """Cover ``shape`` with ``patch``-sized tiles overlapping by the fraction ``overlap`` (0 <= overlap < 1)."""
    padded = _padded(shape, patch, overlap)
    axes = [_axis_starts(length, p, overlap) for length, p in zip(padded, patch)]
    return TilingPlan(tuple(shape), tuple(patch), padded, tuple(product(*axes)))


def _padded(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> tuple[int, ...]:
    if len(shape) != len(patch):
        raise ValueError(f"volume shape {tuple(shape)} and patch {tuple(patch)} differ in dimensionality")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    return tuple(max(s, p) for s, p in zip(shape, patch))


def extract_tiles(volume: np.ndarray, plan: TilingPlan, pad_value: float = 0.0) -> np.ndarray:
    """Cut ``volume`` (C, *shape) into tiles (N, C, *patch), padding the far ends with ``pad_value``."""
    spatial = volume.shape[1:]
    if tuple(spatial) != plan.shape:
        raise ValueError(f"volume spatial shape {tuple(spatial)} does not match the plan's {plan.shape}")
    pad = [(0, 0)] + [(0, p - s) for s, p in zip(spatial, plan.padded)]
    padded = np.pad(volume, pad, constant_values=pad_value) if any(after for _, after in pad) else volume
    tiles = np.empty((len(plan), volume.shape[0], *plan.patch), dtype=volume.dtype)
    for i, start in enumerate(plan.starts):
        tiles[i] = padded[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, plan.patch))]
    return tiles


def tile_weight(patch: tuple[int, ...], weighting: str = "gaussian") -> np.ndarray:
    """Per-voxel weight of a tile: a Gaussian (sigma = patch/8, peak 1) favours tile centres, or all ones."""
    if weighting == "constant":
        return np.ones(patch, dtype=np.float64)
    if weighting != "gaussian":
        raise ValueError(f"tile weighting {weighting!r} is unknown; expected one of {WEIGHTINGS}")
    weight = np.ones((), dtype=np.float64)
    for p in patch:
        centre, sigma = (p - 1) / 2.0, p / 8.0
        axis = np.exp(-((np.arange(p) - centre) ** 2) / (2.0 * sigma**2))
        weight = np.multiply.outer(weight, axis)
    return np.maximum(weight, 1e-6)


def stitch_tiles(tiles: np.ndarray, plan: TilingPlan, weighting: str = "gaussian") -> np.ndarray:
    """Blend per-tile outputs (N, K, *patch) into (K, *shape) float32, weighting overlaps by ``weighting``."""
    if tiles.shape[0] != len(plan) or tuple(tiles.shape[2:]) != plan.patch:
        raise ValueError(f"tiles of shape {tiles.shape} do not match a plan of {len(plan)} tiles of {plan.patch}")
    weight = tile_weight(plan.patch, weighting)
    total = np.zeros((tiles.shape[1], *plan.padded), dtype=np.float64)
    weights = np.zeros(plan.padded, dtype=np.float64)
    for tile, start in zip(tiles, plan.starts):
        window = tuple(slice(s, s + p) for s, p in zip(start, plan.patch))
        total[(slice(None),) + window] += tile * weight
        weights[window] += weight
    crop = tuple(slice(0, s) for s in plan.shape)
    return (total[(slice(None),) + crop] / weights[crop]).astype(np.float32)
