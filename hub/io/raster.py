"""PNG and JPEG decoding with Pillow (8/16-bit grey, RGB), size checked before pixels are decoded."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image

from hub.errors import CorruptFileError, LimitExceededError, UnsupportedFormatError
from hub.io.image import MONOCHROME2, RGB, MedicalImage, identity_geometry
from hub.io.limits import ReadLimits

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, zlib.error)
"""What Pillow raises on hostile PNG/JPEG bytes (truncation, bad chunk lengths, bad Huffman tables, ...)."""

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


def from_pil(image: Image.Image, limits: ReadLimits, source: str, fmt: str = "pil") -> MedicalImage:
    """Decode a (lazily opened) Pillow image after checking its declared size against ``limits``."""
    limits.check_pixels((image.height, image.width), source)
    mode = image.mode
    if mode not in _BIT_DEPTH:
        raise UnsupportedFormatError(f"{source} has Pillow mode {mode!r}; expected grey (8/16-bit) or RGB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise LimitExceededError(f"{source} is larger than Pillow's decompression-bomb limit: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptFileError(f"{source} could not be decoded as {fmt.upper()}: {exc}") from exc
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
    return MedicalImage(
        array=array,
        spatial_dims=2,
        photometric=RGB if array.ndim == 3 else MONOCHROME2,
        bit_depth=_BIT_DEPTH[mode],
        meta={"format": fmt},
        **identity_geometry(2),
    )


def png_declared_shape(head: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, or None when the chunk is not where the format puts it."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def read_raster(data: bytes | str, limits: ReadLimits, source: str, fmt: str, head: bytes = b"") -> MedicalImage:
    """Read PNG/JPEG from a path or from bytes; ``head`` (the first bytes) lets a PNG be refused before Pillow."""
    declared = png_declared_shape(head) if fmt == "png" else None
    if declared is not None:
        limits.check_pixels(declared, source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError as exc:
        raise LimitExceededError(f"{source} is larger than Pillow's decompression-bomb limit: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptFileError(f"{source} could not be opened as {fmt.upper()}: {exc}") from exc
    with image:
        return from_pil(image, limits, source, fmt)
