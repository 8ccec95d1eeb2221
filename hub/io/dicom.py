"""DICOM files and series folders: header checked with pydicom, pixels decoded by SimpleITK (GDCM).

Pixel policy (SimpleITK's, documented here because users compare against pydicom): rescale slope/intercept
are applied (CT in HU, MR possibly float), and MONOCHROME1 data are inverted as ``(2**BitsStored - 1) - stored``
so the returned array always has MONOCHROME2 meaning (bright = dense). The header's photometric
interpretation is kept in ``meta["source_photometric"]``.

Uncompressed single-frame greyscale files are decoded by pydicom instead, with the same policy and GDCM's own
geometry and pixel type: GDCM took 210 ms for the 7 MB radiograph RG1_UNCI.dcm, this path 20 ms. Every such
file that ships with pydicom-data and pydicom gives identical arrays, types and geometry either way (tested).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import BytesLengthException, InvalidDicomError

from hub.errors import CorruptFileError, InputError, UnsupportedFormatError
from hub.io.declared import Inspect, declared_volume
from hub.io.image import MONOCHROME2, RGB, MedicalImage
from hub.io.limits import ReadLimits

# GDCM warnings can quote header values; they must not reach logs.
sitk.ProcessObject.SetGlobalWarningDisplay(False)

MODALITIES = {
    "CR": "xray",
    "DX": "xray",
    "RG": "xray",
    "MG": "xray",
    "XA": "xray",
    "RF": "xray",
    "PX": "xray",
    "IO": "xray",
    "CT": "ct",
    "MR": "mri",
    "SM": "pathology",
}
_NOT_IMAGES = {
    "SEG": "a DICOM Segmentation",
    "RTSTRUCT": "an RT Structure Set",
    "SR": "a Structured Report",
    "RTPLAN": "an RT Plan",
    "PR": "a Presentation State",
    "KO": "a Key Object Selection",
}


_PARSE_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    NotImplementedError,
    RecursionError,
    OverflowError,
    struct.error,
)
"""What pydicom raises on hostile bytes: wrong value lengths, unknown VRs, deeply nested sequences, truncation."""


def _header(path: str, source: str) -> pydicom.Dataset:
    """The header without pixel data, every element decoded now so that a corrupt one fails here, not later.

    A file with an element that runs past its end is refused here too (see :func:`_runs_past_end`), and so is one
    whose file meta information holds an element pydicom cannot decode: GDCM reads the length of an unknown VR
    ("EI" for a bit-flipped "UI") as 4 bytes, allocated 740 MB for a 10 KB file and never freed them when its
    read failed (1.5 GB per request: the fuzz campaign's worker growth).
    The error names only the kind of fault: pydicom's messages quote the offending bytes, which may be patient data.
    """
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            truncated = _runs_past_end(f, ds)
        for _ in ds.iterall():
            pass
        for _ in getattr(ds, "file_meta", ()):
            pass
    except _PARSE_ERRORS as exc:
        raise CorruptFileError(
            f"{source} is not a readable DICOM file ({type(exc).__name__} while parsing its header)"
        ) from None
    if truncated:
        raise CorruptFileError(f"{source} is a damaged DICOM file: an element runs past the end of the file")
    return ds


_PIXEL_TAGS = {b"\xe0\x7f\x10\x00": "<", b"\x7f\xe0\x00\x10": ">"}
_ITEM, _SEQUENCE_END, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF


def _runs_past_end(f: BinaryIO, ds: pydicom.Dataset) -> bool:
    """Whether an element of the file open in ``f`` (its header just read into ``ds``) declares more bytes than the
    file holds: the last header element, the pixel data (or one of its fragments) or an element after it.

    GDCM allocates 2-4 GiB before it gives up on such a file (an RLE or JPEG file cut inside its last fragment,
    bytes inserted into the pixel data so that the rest reads as elements of any length); pydicom keeps the short
    value without a word. Deflated files are not checked (their offsets are not file offsets)."""
    if _deflated(ds):
        return False
    stop, size = f.tell(), os.fstat(f.fileno()).st_size
    if stop >= size:
        return _last_element_short(ds, size)
    end = _pixel_data_end(f, stop, size)
    if end is None:
        return True
    if end >= size:
        return False
    f.seek(end)
    is_implicit, is_little = ds.original_encoding
    tail = pydicom.filereader.read_dataset(f, bool(is_implicit), is_little is not False)
    return _last_element_short(tail, size) or f.tell() < size


def _last_element_short(ds: pydicom.Dataset, size: int) -> bool:
    """Whether the last element of ``ds``, read up to the end of a file of ``size`` bytes, is cut short (pydicom
    also drops a partial element header at the end of a file, so the last element must end exactly there)."""
    if not ds.keys():
        return False
    last = ds.get_item(list(ds.keys())[-1])
    if not isinstance(last, pydicom.dataelem.RawDataElement) or last.length == _UNDEFINED:
        return False
    return last.value_tell + last.length != size


def _deflated(ds: pydicom.Dataset) -> bool:
    syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    return str(syntax) == "1.2.840.10008.1.2.1.99"


def _pixel_data_end(f: BinaryIO, stop: int, size: int) -> int | None:
    """The offset just past the Pixel Data element at ``stop`` (``stop`` itself when something else is there), or
    None when the element, or one of its encapsulated fragments, runs past the end of a file of ``size`` bytes."""
    f.seek(stop)
    head = f.read(12)
    order = _PIXEL_TAGS.get(head[:4])
    if order is None:
        return stop
    explicit = head[4:6].isalpha()
    if len(head) < (12 if explicit else 8):
        return None
    length = struct.unpack(order + "I", head[8:12] if explicit else head[4:8])[0]
    position = stop + (12 if explicit else 8)
    if length != _UNDEFINED:
        return position + length if position + length <= size else None
    while position < size:  # encapsulated: items, then a sequence delimiter (or the end of the file)
        f.seek(position)
        item = f.read(8)
        if len(item) < 8:
            return None
        group, element, length = struct.unpack("<HHI", item)
        position += 8 + (length if length != _UNDEFINED else size)
        if group << 16 | element == _SEQUENCE_END:
            return position
        if group << 16 | element != _ITEM or position > size:
            return None
    return position


def _declared_shape(ds: pydicom.Dataset, source: str) -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples) as the header claims them, refusing non-image objects."""
    modality = str(ds.get("Modality", ""))
    if modality in _NOT_IMAGES:
        raise UnsupportedFormatError(f"{source} is {_NOT_IMAGES[modality]} object, not an image")
    if "Rows" not in ds or "Columns" not in ds:
        if _image_storage(ds) or not ds.keys():
            raise CorruptFileError(
                f"{source} is a truncated or damaged DICOM image: its header ends before the image size (Rows, Columns)"
            )
        raise UnsupportedFormatError(f"{source} is a DICOM object without pixel data; expected an image")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return frames, int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError, OverflowError):
        raise CorruptFileError(
            f"{source} has an unreadable image size (NumberOfFrames, Rows, Columns or "
            "SamplesPerPixel) in its DICOM header; expected whole numbers"
        ) from None


def _image_storage(ds: pydicom.Dataset) -> bool:
    """Whether the file's SOP class (from the data set, else the file meta) is one of the image storage classes."""
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return isinstance(uid, pydicom.uid.UID) and "Image Storage" in uid.name


def _bits_stored(ds: pydicom.Dataset, source: str) -> int | None:
    """BitsStored as an int in 1..32, None when absent; anything else is a corrupt header."""
    bits = ds.get("BitsStored")
    if bits is None or bits == "":
        return None
    try:
        value = int(bits)
    except (TypeError, ValueError):
        value = 0
    if not 1 <= value <= 32:
        raise CorruptFileError(f"{source} has an invalid BitsStored in its DICOM header; expected 1 to 32")
    return value


def _rescale(ds: pydicom.Dataset, source: str) -> dict[str, float]:
    """RescaleSlope/RescaleIntercept as finite floats (absent or empty: not set); multi-valued is corrupt."""
    out = {}
    for key, tag in (("rescale_slope", "RescaleSlope"), ("rescale_intercept", "RescaleIntercept")):
        value = ds.get(tag)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise CorruptFileError(f"{source} has an invalid {tag} in its DICOM header; expected one finite number")
        out[key] = number
    return out


def _facts(ds: pydicom.Dataset, colour: bool, frames: int, source: str) -> dict:
    photometric = str(ds.get("PhotometricInterpretation", MONOCHROME2))
    dicom_modality = str(ds.get("Modality", ""))
    bits = _bits_stored(ds, source)
    meta = {
        "format": "dicom",
        "dicom_modality": dicom_modality,
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        "source_photometric": photometric,
        "frames": frames,
    }
    meta.update(_rescale(ds, source))
    return {
        "modality": MODALITIES.get(dicom_modality),
        "photometric": RGB if colour else MONOCHROME2,
        "bit_depth": int(bits) if bits is not None else None,
        "meta": meta,
    }


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}  # implicit/explicit LE, BE
_SITK_DTYPES = {
    sitk.sitkUInt8: np.uint8,
    sitk.sitkInt8: np.int8,
    sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16,
    sitk.sitkUInt32: np.uint32,
    sitk.sitkInt32: np.int32,
    sitk.sitkFloat32: np.float32,
    sitk.sitkFloat64: np.float64,
}


def _decoded_by_pydicom(path: str, ds: pydicom.Dataset, frames: int, samples: int, source: str) -> MedicalImage | None:
    """The file's image via pydicom when it is uncompressed, single-frame, 8/16/32-bit greyscale; else None (GDCM
    decodes it). MONOCHROME1 with a rescale is left to GDCM: no shipped file shows in which order it applies them."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds
    if (
        syntax not in _NATIVE_SYNTAXES
        or frames != 1
        or samples != 1
        or photometric not in ("MONOCHROME1", MONOCHROME2)
        or ds.get("BitsAllocated") not in (8, 16, 32)
        or (photometric == "MONOCHROME1" and rescaled)
    ):
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        dtype = _SITK_DTYPES.get(reader.GetPixelID())
        if dtype is None or reader.GetNumberOfComponents() != 1:
            return None
        stored = pydicom.dcmread(path, force=True).pixel_array
    except Exception:  # anything pydicom cannot decode goes to GDCM, which reports it
        return None
    if photometric == "MONOCHROME1":  # pydicom has cleared the bits above BitsStored, so unsigned cannot wrap
        wide = stored if stored.dtype.kind == "u" else stored.astype(np.int64)
        values = np.subtract(2 ** (_bits_stored(ds, source) or 16) - 1, wide, dtype=wide.dtype)
    elif rescaled:
        rescale = _rescale(ds, source)
        values = stored * rescale.get("rescale_slope", 1.0) + rescale.get("rescale_intercept", 0.0)
    else:
        values = stored
    return MedicalImage.from_sitk(
        reader, array=values.astype(dtype, copy=False)[None], **_facts(ds, False, frames, source), dicom_headers=(ds,)
    )


def _execute(reader: sitk.ImageFileReader | sitk.ImageSeriesReader, source: str) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise CorruptFileError(f"{source} could not be decoded as DICOM pixel data ({reason})") from exc


def read_dicom_file(path: str, limits: ReadLimits, source: str, inspect: Inspect | None = None) -> MedicalImage:
    """Read one DICOM file (single or multi-frame) from disk; ``inspect`` sees a multi-frame file's declared grid
    before its frames are decoded."""
    ds = _header(path, source)
    frames, rows, cols, samples = _declared_shape(ds, source)
    if frames == 1:
        limits.check_pixels((rows, cols), source)
    else:
        limits.check_voxels((frames, rows, cols, samples), source)
        if inspect is not None and (declared := declared_volume(path, "GDCMImageIO")) is not None:
            inspect(declared)
    decoded = _decoded_by_pydicom(path, ds, frames, samples, source)
    if decoded is not None:
        return decoded
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    image = _execute(reader, source)
    return MedicalImage.from_sitk(
        image, **_facts(ds, image.GetNumberOfComponentsPerPixel() > 1, frames, source), dicom_headers=(ds,)
    )


def series_files(folder: str | os.PathLike, limits: ReadLimits) -> list[str]:
    """The files of the one DICOM series in ``folder``, sorted by slice position (GDCM's order)."""
    source = f"DICOM folder {Path(folder).name!r}"
    limits.check_files(sum(1 for entry in os.scandir(folder) if entry.is_file()), source)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise UnsupportedFormatError(f"{source} holds no DICOM series; expected a folder of DICOM slices")
    if len(series) > 1:
        raise InputError(f"{source} holds {len(series)} DICOM series; expected a folder holding exactly one")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def read_dicom_series(folder: str | os.PathLike, limits: ReadLimits) -> MedicalImage:
    """Read a folder holding one DICOM series into a volume sorted by position."""
    source = f"DICOM folder {Path(folder).name!r}"
    files = series_files(folder, limits)
    headers = [_header(f, source) for f in files]
    shapes = {_declared_shape(ds, source) for ds in headers}
    if len(shapes) != 1:
        raise InputError(f"{source} mixes slices of different sizes {sorted(shapes)}; expected one series")
    frames, rows, cols, samples = shapes.pop()
    if frames != 1:
        raise UnsupportedFormatError(f"{source} holds multi-frame files; pass each multi-frame file on its own")
    limits.check_voxels((len(files), rows, cols, samples), source)
    return _read_files(files, headers, source)


def _read_files(files: Sequence[str], headers: Sequence[pydicom.Dataset], source: str) -> MedicalImage:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(list(files))
    image = _execute(reader, source)
    return MedicalImage.from_sitk(
        image, **_facts(headers[0], image.GetNumberOfComponentsPerPixel() > 1, 1, source), dicom_headers=tuple(headers)
    )
