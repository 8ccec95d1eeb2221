"""Budgets a reader checks against the header before it decodes (or allocates) anything."""

from __future__ import annotations

from dataclasses import dataclass

from hub.errors import LimitExceededError


@dataclass(frozen=True)
class ReadLimits:
    """Upper bounds on one input.

    ``max_pixels`` counts the height x width of a 2D image (channels not counted); ``max_voxels`` counts every
    value of a volume (frames and channels included). The defaults admit a 10k x 10k pathology tile, a
    1024 x 1024 x 512 CT (its float32 working copy is 2 GiB) and a 2 GiB file; a service should pass tighter
    ones. Pillow refuses more than about 179 M pixels whatever ``max_pixels`` says.

    ``max_aspect_ratio`` bounds the long side of a 2D image over its short side: a 1 x 50,000,000 PNG is
    69 bytes and within ``max_pixels``, but every resize to a model's square input would then need weights
    proportional to the long side times the output side (about 15 GB), and its decode fails with MemoryError.

    ``max_array_bytes`` bounds the bytes of one array that processing builds from an input, checked before it is
    allocated (the float32 working copy of a volume, its sliding-window tiles): a 512 x 512 x 400 volume (105 M
    voxels, inside ``max_voxels``, a few hundred KB as .nii.gz) becomes 23,064 tiles of 32^3 float32 values,
    2.9 GiB, and the float32 copy of a 512 x 512 x 1024 one is 1 GiB before any cast or resample.
    """

    max_bytes: int = 2 * 1024**3
    max_pixels: int = 10000 * 10000
    max_voxels: int = 1024 * 1024 * 512
    max_files: int = 4096
    max_aspect_ratio: int = 100
    max_array_bytes: int = 512 * 1024**2

    def check_bytes(self, n: int, source: str) -> None:
        if n > self.max_bytes:
            raise LimitExceededError(f"{source} is {n} bytes, over the limit of {self.max_bytes} bytes")

    def check_pixels(self, shape: tuple[int, ...], source: str) -> None:
        """Check a 2D image's (height, width) as declared by its header."""
        count = _product(shape)
        if count > self.max_pixels:
            raise LimitExceededError(
                f"{source} declares {'x'.join(map(str, shape))} = {count} pixels, over the limit of {self.max_pixels}"
            )
        sides = [int(n) for n in shape[:2]]
        if min(sides) >= 1 and max(sides) > self.max_aspect_ratio * min(sides):
            raise LimitExceededError(
                f"{source} declares {'x'.join(map(str, sides))} pixels, an aspect ratio over the limit of "
                f"{self.max_aspect_ratio}:1"
            )

    def check_voxels(self, shape: tuple[int, ...], source: str) -> None:
        """Check a volume's declared shape (all axes, channels included)."""
        count = _product(shape)
        if count > self.max_voxels:
            raise LimitExceededError(
                f"{source} declares {'x'.join(map(str, shape))} = {count} voxels, over the limit of {self.max_voxels}"
            )

    def check_array(self, shape: tuple[int, ...], itemsize: int, what: str) -> None:
        """Check an intermediate array of ``shape`` and ``itemsize``-byte values before allocating it."""
        n = _product(shape) * int(itemsize)
        if n > self.max_array_bytes:
            raise LimitExceededError(
                f"{what} would take {'x'.join(map(str, shape))} values = {n} bytes, over the limit of "
                f"{self.max_array_bytes} bytes for one array; send a smaller volume"
            )

    def check_files(self, n: int, source: str) -> None:
        if n > self.max_files:
            raise LimitExceededError(f"{source} holds {n} files, over the limit of {self.max_files}")


DEFAULT_LIMITS = ReadLimits()


def _product(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count
