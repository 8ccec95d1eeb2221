"""Hostile inputs are refused quickly, with the project's errors, without allocating their claimed size."""

import gzip
import io
import resource
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest
from io_fixtures import MNI_T1, dicom_file
from PIL import Image

from hub.errors import CorruptFileError, LimitExceededError, UnsupportedFormatError
from hub.io import ReadLimits, read_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header for a huge 8-bit grey image, followed by a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def nifti_claiming(dims: tuple[int, ...], datatype: int = 16, bitpix: int = 32) -> bytes:
    """A NIfTI-1 header (348 bytes + 4-byte extension flag) declaring ``dims``, with 64 bytes of data."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    return bytes(header) + b"\0" * 4 + b"\0" * 64


def _valid_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_valid_png())
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = b"\xff" * 40
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _dicom_claiming_frames(tmp_path) -> bytes:
    ds = pydicom.dcmread(dicom_file("emri_small.dcm"))
    ds.NumberOfFrames = 2_000_000
    path = tmp_path / "frames.dcm"
    ds.save_as(path)
    return path.read_bytes()


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


CASES = {
    "empty file": (lambda tmp: b"", CorruptFileError),
    "wrong magic": (lambda tmp: b"GIF89a" + bytes(2000), UnsupportedFormatError),
    "text named like an image": (lambda tmp: b"hello, this is not an image\n" * 50, UnsupportedFormatError),
    "truncated PNG": (lambda tmp: _valid_png()[:200], CorruptFileError),
    "corrupt PNG": (lambda tmp: _corrupt_png(), CorruptFileError),
    "PNG claiming 40000x40000": (lambda tmp: png_claiming(40000, 40000), LimitExceededError),
    "JPEG claiming 40000x40000": (lambda tmp: _jpeg_claiming(40000, 40000), LimitExceededError),
    "NIfTI claiming 2**34 voxels": (lambda tmp: nifti_claiming((2048, 2048, 4096)), LimitExceededError),
    "gzipped NIfTI claiming 2**34 voxels": (
        lambda tmp: gzip.compress(nifti_claiming((4096, 4096, 1024)), mtime=0),
        LimitExceededError,
    ),
    "NIfTI-2 style bad header": (lambda tmp: struct.pack("<i", 540) + b"n+2\0" + bytes(600), CorruptFileError),
    "truncated NIfTI": (lambda tmp: nifti_claiming((64, 64, 64))[:1000], CorruptFileError),
    "truncated NIfTI.gz": (lambda tmp: MNI_T1.read_bytes()[:200_000], CorruptFileError),
    "truncated DICOM": (lambda tmp: dicom_file("RG1_UNCR.dcm").read_bytes()[:100_000], CorruptFileError),
    "DICOM claiming 2e6 frames": (_dicom_claiming_frames, LimitExceededError),
}


@pytest.mark.parametrize("as_file", [True, False], ids=["file", "bytes"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_fast_and_small(case, as_file, tmp_path):
    make, error = CASES[case]
    data = make(tmp_path)
    source = tmp_path / "upload.bin"
    source.write_bytes(data)
    rss_before = _rss_bytes()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(error) as caught:
            read_image(source if as_file else data)
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 32 * 2**20  # the claimed sizes are GBs; Python-side allocations stay small
    assert _rss_bytes() - rss_before < 256 * 2**20  # and so does native memory (SimpleITK, Pillow)
    message = str(caught.value)
    assert ("upload.bin" if as_file else "uploaded data") in message


def test_limit_messages_name_the_limit():
    with pytest.raises(LimitExceededError, match=r"40000x40000 = 1600000000 pixels, over the limit of 100000000"):
        read_image(png_claiming(40000, 40000))
    with pytest.raises(LimitExceededError, match="voxels, over the limit of 1000"):
        read_image(MNI_T1, ReadLimits(max_voxels=1000))


def test_byte_and_pixel_budgets_are_configurable():
    png = _valid_png()
    assert read_image(png).array.shape == (64, 64)
    with pytest.raises(LimitExceededError, match="bytes"):
        read_image(png, ReadLimits(max_bytes=100))
    with pytest.raises(LimitExceededError, match="64x64"):
        read_image(png, ReadLimits(max_pixels=64 * 63))
    with pytest.raises(LimitExceededError):
        read_image(np.zeros((10, 10, 10)), ReadLimits(max_voxels=999))


def test_dicom_series_folder_file_budget(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.dcm").write_bytes(dicom_file("693_UNCR.dcm").read_bytes())
    with pytest.raises(LimitExceededError, match="3 files"):
        read_image(tmp_path, ReadLimits(max_files=2))
