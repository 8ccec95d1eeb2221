"""NIfTI-1/2 volumes (.nii, .nii.gz): header parsed and budgeted first, then read by SimpleITK."""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import SimpleITK as sitk

from hub.errors import CorruptFileError, UnsupportedFormatError
from hub.io.image import MONOCHROME2, MedicalImage
from hub.io.limits import ReadLimits

_BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64, 2304: 32}
"""NIfTI datatype code -> bits per voxel (complex and 128-bit types are not supported)."""


@dataclass(frozen=True)
class NiftiHeader:
    shape: tuple[int, ...]
    """Declared dims in NIfTI order (x, y, z, t, ...)."""
    bits_per_voxel: int
    data_offset: int


def parse_header(head: bytes, source: str) -> NiftiHeader:
    """Parse the fields of a NIfTI-1 or NIfTI-2 header that decide how much memory the volume needs."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack_from(order + "i", head, 0)[0] == 348:
            dims = struct.unpack_from(order + "8h", head, 40)
            datatype = struct.unpack_from(order + "h", head, 70)[0]
            offset = struct.unpack_from(order + "f", head, 108)[0]
            if not math.isfinite(offset) or not 0 <= offset < 2**40:
                raise CorruptFileError(
                    f"{source} declares a data offset of {offset} in its NIfTI header; expected a "
                    "finite non-negative number"
                )
            offset = int(offset)
            return _validated(dims, datatype, max(offset, 352), source)
        if len(head) >= 540 and struct.unpack_from(order + "i", head, 0)[0] == 540:
            datatype = struct.unpack_from(order + "h", head, 12)[0]
            dims = struct.unpack_from(order + "8q", head, 16)
            offset = struct.unpack_from(order + "q", head, 168)[0]
            return _validated(dims, datatype, max(offset, 544), source)
    raise CorruptFileError(f"{source} has no valid NIfTI header (sizeof_hdr must be 348 or 540)")


def _validated(dims: tuple[int, ...], datatype: int, offset: int, source: str) -> NiftiHeader:
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise CorruptFileError(f"{source} declares {ndim} dimensions in its NIfTI header; expected 1 to 7")
    shape = tuple(int(n) for n in dims[1 : ndim + 1])
    if any(n < 1 for n in shape):
        raise CorruptFileError(f"{source} declares a non-positive size {shape} in its NIfTI header")
    if datatype not in _BITPIX:
        raise UnsupportedFormatError(f"{source} has NIfTI datatype code {datatype}; expected an integer or float type")
    return NiftiHeader(shape=shape, bits_per_voxel=_BITPIX[datatype], data_offset=offset)


def needed_bytes(header: NiftiHeader) -> int:
    return header.data_offset + int(np.prod(header.shape, dtype=np.int64)) * header.bits_per_voxel // 8


def check(header: NiftiHeader, limits: ReadLimits, source: str, stored_bytes: int | None) -> None:
    """Refuse volumes over the voxel budget, or whose uncompressed size (when known) is short of the header's."""
    shape = header.shape
    if len(shape) > 4:
        raise UnsupportedFormatError(f"{source} is a {len(shape)}D NIfTI image; expected 2D, 3D or 4D")
    limits.check_voxels(tuple(reversed(shape)), source)
    needed = needed_bytes(header)
    if stored_bytes is not None and stored_bytes < needed:
        raise CorruptFileError(
            f"{source} is truncated: its NIfTI header needs {needed} bytes, the data hold {stored_bytes}"
        )


def inflate(data: bytes | str, header: NiftiHeader, source: str, out: BinaryIO) -> int:
    """Decompress a gzipped NIfTI into ``out`` in 4 MiB steps (never the whole volume in memory), refusing a stream
    that is truncated or inflates past what the header needs; returns the bytes written.

    SimpleITK zero-fills a truncated gzip stream without complaint, so the stream is checked here.
    """
    limit = needed_bytes(header) + 2**20
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    with open(data, "rb") if isinstance(data, str) else _Chunks(data) as stream:
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or stream.read(2**22)
            if not chunk:
                raise CorruptFileError(f"{source} is truncated: its gzip stream ends early")
            try:
                part = inflater.decompress(chunk, limit + 1 - total)
            except zlib.error as exc:
                raise CorruptFileError(f"{source} has a corrupt gzip stream ({exc})") from exc
            total += len(part)
            if total > limit:
                raise CorruptFileError(f"{source} inflates to more data than its NIfTI header declares")
            out.write(part)
    return total


class _Chunks:
    def __init__(self, data: bytes) -> None:
        self._view, self._at = memoryview(data), 0

    def read(self, n: int) -> bytes:
        chunk = self._view[self._at : self._at + n].tobytes()
        self._at += len(chunk)
        return chunk

    def __enter__(self) -> _Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self._view.release()


def read_nifti(data: bytes | str, gzipped: bool, header: NiftiHeader, source: str) -> MedicalImage:
    """Decode a NIfTI (path or bytes) whose header has passed :func:`check`."""
    if isinstance(data, str) and not gzipped and data.endswith(".nii"):
        return read_nifti_file(data, source)
    with tempfile.TemporaryDirectory(prefix="medhub-") as tmp:
        path = os.path.join(tmp, "volume.nii")
        with open(path, "wb") as f:
            if gzipped:
                stored = inflate(data, header, source, f)
            else:
                stored = f.write(data if isinstance(data, bytes) else _read(data))
        if stored < needed_bytes(header):
            raise CorruptFileError(
                f"{source} is truncated: its NIfTI header needs {needed_bytes(header)} bytes, the data hold {stored}"
            )
        return read_nifti_file(path, source)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_nifti_file(path: str, source: str) -> MedicalImage:
    """Decode a NIfTI file whose header has already passed :func:`check`; a 4th axis becomes channels."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("NiftiImageIO")
    reader.SetFileName(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise CorruptFileError(f"{source} could not be decoded as NIfTI ({reason})") from exc
    facts = {"modality": None, "photometric": MONOCHROME2, "bit_depth": None, "meta": {"format": "nifti"}}
    if image.GetDimension() == 4:
        if image.GetNumberOfComponentsPerPixel() > 1:
            raise UnsupportedFormatError(
                f"{source} is a 4D NIfTI of {image.GetNumberOfComponentsPerPixel()}-component voxels; expected scalar "
                "voxels in a 4D NIfTI (its 4th axis becomes the channels)"
            )
        array = np.moveaxis(sitk.GetArrayFromImage(image), 0, -1)
        direction = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3].ravel()
        if array.shape[-1] == 1:
            array = array[..., 0]
        return MedicalImage(
            array=array,
            spatial_dims=3,
            spacing=image.GetSpacing()[:3],
            origin=image.GetOrigin()[:3],
            direction=tuple(direction),
            **facts,
        )
    return MedicalImage.from_sitk(image, **facts)
