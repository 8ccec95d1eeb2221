"""``read_image``: one entry point for every input kind, dispatching on content rather than file name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from hub.errors import CorruptFileError, InputError, UnsupportedFormatError
from hub.io import dicom, nifti, raster, reader_warnings
from hub.io.declared import Inspect, declared_nifti
from hub.io.image import MONOCHROME2, RGB, MedicalImage, identity_geometry
from hub.io.limits import DEFAULT_LIMITS, ReadLimits
from hub.io.sniff import DICOM, HEAD_BYTES, JPEG, NIFTI, NIFTI_GZ, PNG, gunzip_head, sniff

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | sitk.Image | MedicalImage

_EXPECTED = "expected PNG, JPEG, DICOM or NIfTI (.nii/.nii.gz)"


def read_image(source: ImageSource, limits: ReadLimits | None = None, inspect: Inspect | None = None) -> MedicalImage:
    """Decode ``source`` into a :class:`MedicalImage`, checking ``limits`` before anything is decoded.

    Accepts a file path (PNG, JPEG, DICOM, NIfTI), a folder holding one DICOM series, the bytes of such a file,
    a PIL image, a numpy array ((H, W), (H, W, 3|4) colour, (D, H, W) volume, (D, H, W, C)), a SimpleITK image,
    or a MedicalImage (returned unchanged). Raises :class:`~hub.errors.InputError` subclasses.

    ``inspect`` gets the grid that the header of a NIfTI volume or a multi-frame DICOM file declares
    (:class:`~hub.io.declared.DeclaredVolume`) before its voxels are inflated or decoded, and may raise to refuse it.

    Decoder warnings (which can quote DICOM header values) are swallowed; their number is kept in
    ``meta["reader_warnings"]`` when there were any.
    """
    if isinstance(source, MedicalImage):
        return source
    with reader_warnings.captured() as count:
        image = _read(source, limits or DEFAULT_LIMITS, inspect)
    if count.n:
        image.meta["reader_warnings"] = count.n
    return image


def _read(source: ImageSource, limits: ReadLimits, inspect: Inspect | None) -> MedicalImage:
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source), limits, inspect)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read_bytes(bytes(source), limits, "uploaded data", inspect)
    if isinstance(source, Image.Image):
        return raster.from_pil(source, limits, "PIL image")
    if isinstance(source, np.ndarray):
        return from_array(source, limits)
    if isinstance(source, sitk.Image):
        return _from_sitk(source, limits)
    raise InputError(
        f"cannot read an input of type {type(source).__name__}; {_EXPECTED}, bytes, PIL, numpy or SimpleITK"
    )


def from_array(array: np.ndarray, limits: ReadLimits = DEFAULT_LIMITS) -> MedicalImage:
    """Wrap a numpy array with unit geometry; see :func:`read_image` for the accepted layouts."""
    source = f"array of shape {array.shape}"
    if array.dtype.kind not in "biuf":
        raise InputError(f"{source} has dtype {array.dtype}; expected integer, boolean or float values")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        limits.check_pixels(array.shape[:2], source)
        if array.ndim == 3:
            array = array[..., :3]
        dims = 2
    elif array.ndim in (3, 4):
        limits.check_voxels(array.shape, source)
        dims = 3
    else:
        raise InputError(f"{source} is not an image; expected (H, W), (H, W, 3), (D, H, W) or (D, H, W, C)")
    colour = dims == 2 and array.ndim == 3
    bits = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(array.dtype)
    return MedicalImage(
        array=array,
        spatial_dims=dims,
        photometric=RGB if colour else MONOCHROME2,
        bit_depth=bits,
        meta={"format": "array"},
        **identity_geometry(dims),
    )


def _from_sitk(image: sitk.Image, limits: ReadLimits) -> MedicalImage:
    shape = tuple(reversed(image.GetSize())) + (image.GetNumberOfComponentsPerPixel(),)
    limits.check_voxels(shape, "SimpleITK image")
    try:
        return MedicalImage.from_sitk(image, meta={"format": "sitk"})
    except ValueError as exc:
        raise InputError(f"SimpleITK image: {exc}") from exc


def _read_path(path: Path, limits: ReadLimits, inspect: Inspect | None) -> MedicalImage:
    source = f"file {path.name!r}"
    if path.is_dir():
        return dicom.read_dicom_series(path, limits)
    if not path.is_file():
        raise InputError(f"{source} does not exist; expected a path to an image file or a DICOM series folder")
    size = path.stat().st_size
    limits.check_bytes(size, source)
    if size == 0:
        raise CorruptFileError(f"{source} is empty; {_EXPECTED}")
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    fmt = sniff(head)
    if fmt in (PNG, JPEG):
        return raster.read_raster(str(path), limits, source, fmt, head)
    if fmt == DICOM:
        return dicom.read_dicom_file(str(path), limits, source, inspect)
    if fmt in (NIFTI, NIFTI_GZ):
        header = _checked_nifti(head, fmt, size, limits, source, inspect)
        return nifti.read_nifti(str(path), fmt == NIFTI_GZ, header, source)
    raise UnsupportedFormatError(f"{source} is not a recognised image format; {_EXPECTED}")


def _read_bytes(data: bytes, limits: ReadLimits, source: str, inspect: Inspect | None) -> MedicalImage:
    limits.check_bytes(len(data), source)
    if not data:
        raise CorruptFileError(f"{source} is empty; {_EXPECTED}")
    head = data[:HEAD_BYTES]
    fmt = sniff(head)
    if fmt in (PNG, JPEG):
        return raster.read_raster(data, limits, source, fmt, head)
    if fmt is None:
        raise UnsupportedFormatError(f"{source} is not a recognised image format; {_EXPECTED}")
    if fmt in (NIFTI, NIFTI_GZ):
        header = _checked_nifti(head, fmt, len(data), limits, source, inspect)
        return nifti.read_nifti(data, fmt == NIFTI_GZ, header, source)
    with tempfile.TemporaryDirectory(prefix="medhub-") as tmp:
        path = os.path.join(tmp, "input.dcm")
        with open(path, "wb") as f:
            f.write(data)
        return dicom.read_dicom_file(path, limits, source, inspect)


def _checked_nifti(
    head: bytes, fmt: str, size: int, limits: ReadLimits, source: str, inspect: Inspect | None
) -> nifti.NiftiHeader:
    """The header of a NIfTI input of ``size`` bytes that starts with ``head``, checked against ``limits`` and
    passed by ``inspect``."""
    if fmt == NIFTI_GZ:
        head = gunzip_head(head)
    header = nifti.parse_header(head, source)
    nifti.check(header, limits, source, None if fmt == NIFTI_GZ else size)
    if inspect is not None and (declared := declared_nifti(head)) is not None:
        inspect(declared)
    return header
