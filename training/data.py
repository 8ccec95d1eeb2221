"""Manifest datasets for training: the repo's own processor, task targets on the model grid, deterministic
augmentation, and a step-indexed sample stream that makes the data position part of the step number.

Preprocessing is never re-implemented here: every image goes through the variant's (or repo's)
`MedicalImageProcessor.prepare`, and masks and boxes follow the spatial record it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from hub.data.manifest import ManifestRow, load_manifest
from hub.io import read_image
from hub.processing import spatial
from hub.processing.processor import MedicalImageProcessor, SpatialRecord

from .config import AugmentSettings
from .errors import TrainingConfigError

TASK_KINDS = ("classification", "segmentation", "detection")


@dataclass(frozen=True)
class Target:
    """What a task learns: `kind`, its class names, and for classification the manifest `labels` key."""

    kind: str
    class_names: tuple[str, ...]
    label: str | None = None


@dataclass(frozen=True)
class ManifestRows:
    """The rows of one manifest split, with their 1-based row numbers for error messages."""

    name: str
    root: Path
    rows: tuple[tuple[int, ManifestRow], ...]


def read_split(manifest: str | Path, split: str = "train", modality: str | None = None) -> ManifestRows:
    """Validated rows of `split` (and `modality`); a missing file or malformed row is reported by row number."""
    manifest = Path(manifest)
    rows = load_manifest(manifest)
    chosen = tuple(
        (number, row)
        for number, row in enumerate(rows, start=1)
        if row.split == split and (modality is None or row.modality == modality)
    )
    if not chosen:
        where = f"split {split!r}" + (f" with modality {modality!r}" if modality else "")
        raise TrainingConfigError(f"manifest {manifest.name!r} has no rows in {where}")
    return ManifestRows(manifest.name, manifest.parent, chosen)


def mask_to_grid(mask: np.ndarray, record: SpatialRecord) -> np.ndarray:
    """Map an input-grid label mask onto the model's input grid with the processor's spatial steps (nearest)."""
    values = mask.astype(np.float32)[None]
    if record.processed_grid is not None:
        values = spatial.resample_channels(values, record.input_grid, record.processed_grid, nearest=True)
    if record.resized_shape:
        tensor = torch.from_numpy(np.ascontiguousarray(values))[None]
        values = F.interpolate(tensor, size=record.resized_shape, mode="nearest-exact")[0].numpy()
    values = spatial.crop_pad(values, record.output_shape, record.starts)
    return np.rint(values[0]).astype(np.int64)


def boxes_to_grid(boxes: list[list[float]], record: SpatialRecord) -> np.ndarray:
    """xyxy pixel boxes on the input grid -> the model's input grid (2D: resize, then crop/pad offset)."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if record.resized_shape:
        sy, sx = (r / b for r, b in zip(record.resized_shape, record.base_shape))
        out = out * np.array([sx, sy, sx, sy], dtype=np.float32)
    out = out - np.array([record.starts[1], record.starts[0]] * 2, dtype=np.float32)
    height, width = record.output_shape
    out = np.clip(out, 0, [width, height, width, height])
    keep = (out[:, 2] - out[:, 0] >= 1) & (out[:, 3] - out[:, 1] >= 1)
    return out[keep]


class ManifestDataset(Dataset):
    """Preprocessed images (cached after the first read) and, given a `target`, their labels, masks or boxes."""

    def __init__(self, rows: ManifestRows, processor: MedicalImageProcessor, target: Target | None = None):
        self.rows, self.processor, self.target = rows, processor, target
        self._cache: dict[int, dict[str, Any]] = {}
        if target is not None:
            for number, row in rows.rows:
                self._check_row(number, row)

    def __len__(self) -> int:
        return len(self.rows.rows)

    def _where(self, number: int) -> str:
        return f"manifest {self.rows.name!r} row {number}"

    def _check_row(self, number: int, row: ManifestRow) -> None:
        target = self.target
        if target.kind == "classification":
            if target.label not in row.labels:
                raise TrainingConfigError(
                    f"{self._where(number)}: no label {target.label!r} (row has {sorted(row.labels) or 'none'})"
                )
            value = row.labels[target.label]
            if value != int(value) or not 0 <= value < len(target.class_names):
                raise TrainingConfigError(
                    f"{self._where(number)}: label {target.label!r} = {value} is not a class index "
                    f"0..{len(target.class_names) - 1} ({', '.join(target.class_names)})"
                )
        elif target.kind == "segmentation" and row.mask is None:
            raise TrainingConfigError(f"{self._where(number)}: segmentation needs a mask")

    def sample(self, index: int) -> dict[str, Any]:
        """Processor output and targets of row `index` (no augmentation)."""
        if index in self._cache:
            return self._cache[index]
        number, row = self.rows.rows[index]
        image_path, mask_path = row.resolve(self.rows.root)
        prepared = self.processor.prepare(image_path)
        item: dict[str, Any] = {"pixel_values": torch.from_numpy(prepared.pixel_values)}
        kind = self.target.kind if self.target else None
        if kind == "classification":
            item["labels"] = torch.tensor(int(row.labels[self.target.label]))
        elif kind == "segmentation":
            mask = mask_to_grid(read_image(mask_path).array, prepared.record)
            if mask.max() >= len(self.target.class_names):
                raise TrainingConfigError(
                    f"{self._where(number)}: mask value {int(mask.max())} has no class "
                    f"(classes 0..{len(self.target.class_names) - 1}: {', '.join(self.target.class_names)})"
                )
            item["labels"] = torch.from_numpy(mask)
        elif kind == "detection":
            boxes = boxes_to_grid(row.boxes, prepared.record)
            item["boxes"] = torch.from_numpy(boxes)
            item["class_labels"] = torch.zeros(len(boxes), dtype=torch.long)
        self._cache[index] = item
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index)


# ----- augmentation ----------------------------------------------------------------------------------------


def sample_generator(*keys: int) -> torch.Generator:
    """A generator seeded from integer keys (seed, epoch, index, view): same keys, same draws, any process."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _rotate(values: torch.Tensor, radians: float, mode: str) -> torch.Tensor:
    """Rotate (C, H, W) or (C, D, H, W) in the H-W plane about the centre; outside becomes 0."""
    cos, sin = math.cos(radians), math.sin(radians)
    if values.ndim == 3:
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]])
    else:
        theta = torch.tensor([[cos, -sin, 0.0, 0.0], [sin, cos, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    batch = values[None].float()
    grid = F.affine_grid(theta[None], list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def augment(item: dict[str, Any], settings: AugmentSettings, generator: torch.Generator) -> dict[str, Any]:
    """Random flips, in-plane rotation (not for boxes) and Gaussian noise; masks and boxes move with the image."""
    pixels = item["pixel_values"]
    labels = item.get("labels")
    dense = labels is not None and labels.ndim == pixels.ndim - 1
    boxes = item.get("boxes")
    out = dict(item)
    for axis in settings.flip_axes:
        if _uniform(generator) < settings.flip_prob:
            pixels = pixels.flip(axis)
            if dense:
                labels = labels.flip(axis)
            if boxes is not None:
                size = pixels.shape[axis]
                lo, hi = (0, 2) if axis == -1 else (1, 3)
                boxes = boxes.clone()
                boxes[:, [lo, hi]] = size - boxes[:, [hi, lo]]
    if settings.rotate_degrees > 0 and boxes is None:
        radians = math.radians(_uniform(generator, -settings.rotate_degrees, settings.rotate_degrees))
        pixels = _rotate(pixels, radians, "bilinear")
        if dense:
            labels = _rotate(labels[None].float(), radians, "nearest")[0].round().long()
    if settings.noise_std > 0:
        pixels = pixels + settings.noise_std * torch.randn(pixels.shape, generator=generator)
    out["pixel_values"] = pixels.contiguous()
    if dense:
        out["labels"] = labels.contiguous()
    if boxes is not None:
        out["boxes"] = boxes
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixel values and dense/class labels; detection targets stay a list of dicts per image."""
    batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items])}
    if "boxes" in items[0]:
        batch["labels"] = [{"boxes": item["boxes"], "class_labels": item["class_labels"]} for item in items]
    elif "labels" in items[0]:
        batch["labels"] = torch.stack([item["labels"] for item in items])
    return batch


# ----- which samples each step reads ----------------------------------------------------------------------


class IndexStream:
    """The samples every step reads, as a pure function of (seed, step): resuming at step s reads what an
    uninterrupted run reads at step s.

    Without `weights`, the datasets are concatenated and read as a stream of epochs, each epoch the permutation
    `torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))` (DistributedSampler's shuffle),
    so every sample is read once per epoch. With per-dataset `weights`, step s draws its global batch with
    replacement from `torch.multinomial` seeded with `seed + step`, each sample of dataset d having probability
    proportional to `weights[d] / len(d)`. The global batch is `batch_size * world`; rank r reads its r-th slice.
    """

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        weights: list[float] | None = None,
    ):
        if weights is not None and (len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0):
            raise TrainingConfigError(f"dataset weights {weights} must be {len(sizes)} non-negative numbers, not all 0")
        self.sizes, self.batch_size, self.seed, self.rank, self.world = list(sizes), batch_size, seed, rank, world
        self.total = sum(sizes)
        self._probabilities = None
        if weights is not None:
            self._probabilities = torch.cat(
                [torch.full((n,), w / n, dtype=torch.float64) for n, w in zip(sizes, weights)]
            )
        self._epoch_cache: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (
                epoch,
                torch.randperm(self.total, generator=torch.Generator().manual_seed(self.seed + epoch)),
            )
        return self._epoch_cache[1]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """(sample index into the concatenated datasets, epoch) for every sample of the global batch."""
        size = self.batch_size * self.world
        if self._probabilities is not None:
            generator = torch.Generator().manual_seed(self.seed + step)
            picks = torch.multinomial(self._probabilities, size, replacement=True, generator=generator)
            return [(int(i), step) for i in picks]
        out = []
        for position in range(step * size, (step + 1) * size):
            epoch, within = divmod(position, self.total)
            out.append((int(self._permutation(epoch)[within]), epoch))
        return out

    def batch(self, step: int) -> list[tuple[int, int]]:
        return self.global_batch(step)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


class _Steps(Dataset):
    def __init__(self, make_batch: Callable[[int], Any], num_steps: int):
        self.make_batch, self.num_steps = make_batch, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> Any:
        return self.make_batch(step)


def _identity(batch: Any) -> Any:
    return batch


class StepLoader:
    """Batches by step number; consecutive steps stream through a DataLoader (with workers if asked), and a
    jump (resume, or a task visited again) restarts the stream at the requested step."""

    def __init__(self, make_batch: Callable[[int], Any], num_steps: int, num_workers: int = 0):
        self.dataset = _Steps(make_batch, num_steps)
        self.num_workers = num_workers
        self._iterator = None
        self._next = -1

    def get(self, step: int) -> Any:
        if step != self._next:
            # A private generator: starting a DataLoader must not draw from the global RNG, whose state is
            # part of the run (dropout) and is restored exactly on resume.
            loader = DataLoader(
                self.dataset,
                batch_size=None,
                sampler=range(step, len(self.dataset)),
                num_workers=self.num_workers,
                collate_fn=_identity,
                generator=torch.Generator().manual_seed(step),
            )
            self._iterator = iter(loader)
        self._next = step + 1
        return next(self._iterator)
