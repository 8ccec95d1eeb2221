"""Hostile headers and bytes become CorruptFileError (422) in one sentence at the reader, not a crash (issue 13)."""

import gzip
import io
import struct
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_fixtures import PYDICOM_TEST_FILES, dicom_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hub.errors import CorruptFileError, UnsupportedFormatError
from hub.io import read_image


def _edited(tmp_path, name: str, tag: str, value) -> str:
    ds = pydicom.dcmread(dicom_file(name))
    setattr(ds, tag, value)
    path = tmp_path / f"edited_{name}"
    ds.save_as(path)
    return str(path)


# 693_UNCR is decoded by pydicom, 693_J2KR by GDCM, RG1_UNCR is MONOCHROME1 (inverted with BitsStored).
@pytest.mark.parametrize("name", ["693_UNCR.dcm", "693_J2KR.dcm", "RG1_UNCR.dcm"])
@pytest.mark.parametrize("bits", [0, 33, 1024, 65535])
def test_bits_stored_out_of_range_is_corrupt(tmp_path, name, bits):
    with pytest.raises(CorruptFileError, match="BitsStored"):
        read_image(_edited(tmp_path, name, "BitsStored", bits))


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "693_J2KR.dcm"])
@pytest.mark.parametrize("tag", ["RescaleSlope", "RescaleIntercept"])
def test_multi_valued_or_non_finite_rescale_is_corrupt(tmp_path, name, tag):
    for value in (["1", "2"], "NaN", "inf"):
        with pytest.raises(CorruptFileError, match=tag):
            read_image(_edited(tmp_path, name, tag, value))


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "693_J2KR.dcm"])
def test_empty_rescale_slope_is_the_identity(tmp_path, name):
    reference = read_image(dicom_file(name))
    ds = pydicom.dcmread(dicom_file(name))
    ds.RescaleSlope = ""
    path = tmp_path / "empty_slope.dcm"
    ds.save_as(path)
    image = read_image(str(path))
    assert "rescale_slope" not in image.meta and image.meta["rescale_intercept"] == -1024.0
    np.testing.assert_array_equal(image.array, reference.array)


def _nifti_bytes(vox_offset: float) -> bytes:
    data = bytearray(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)).to_bytes())
    struct.pack_into("<f", data, 108, vox_offset)
    return bytes(data)


@pytest.mark.parametrize("vox_offset", [float("inf"), float("-inf"), float("nan"), -1.0, 1e30])
@pytest.mark.parametrize("compress", [False, True])
def test_nifti_non_finite_or_negative_vox_offset_is_corrupt(vox_offset, compress):
    data = _nifti_bytes(vox_offset)
    with pytest.raises(CorruptFileError, match="data offset"):
        read_image(gzip.compress(data) if compress else data)


def _dicom_bytes(**header) -> bytes:
    """A valid 4 x 4 uint16 DICOM (explicit VR little endian), with extra header elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", 4, 4, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    for tag, value in header.items():
        setattr(ds, tag, value)
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _before_pixels(data: bytes, element: bytes) -> bytes:
    at = data.index(b"\xe0\x7f\x10\x00")  # the PixelData tag
    return data[:at] + element + data[at:]


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _nested_sequences(depth: int) -> bytes:
    sequence = struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF)  # undefined length
    item, item_end = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (sequence + item) * depth + (item_end + sequence_end) * depth


def _rows_of_three_bytes(data: bytes) -> bytes:
    rows = _element(0x0028, 0x0010, b"US", struct.pack("<H", 4))
    assert rows in data
    return data.replace(rows, _element(0x0028, 0x0010, b"US", b"\x04\x00\x00"))


HOSTILE_DICOM = {
    "unknown VR": (lambda d: _before_pixels(d, _element(0x0011, 0x0010, b"ZZ", b"ab")), "NotImplementedError"),
    "odd US length": (lambda d: _before_pixels(d, _element(0x0028, 0x0106, b"US", b"abc")), "BytesLengthException"),
    "odd Rows length": (_rows_of_three_bytes, "BytesLengthException"),
    "1500 nested sequences": (lambda d: _before_pixels(d, _nested_sequences(1500)), "RecursionError"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_DICOM))
@pytest.mark.parametrize("as_path", [False, True])
def test_hostile_dicom_elements_are_corrupt_in_one_sentence(tmp_path, case, as_path):
    edit, kind = HOSTILE_DICOM[case]
    data = edit(_dicom_bytes())
    source = data
    if as_path:
        source = tmp_path / "hostile.dcm"
        source.write_bytes(data)
    with pytest.raises(CorruptFileError, match=kind) as info:
        read_image(source)
    message = str(info.value)
    assert message.startswith("file 'hostile.dcm'" if as_path else "uploaded data") and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no pydicom traceback quoting bytes


def test_valid_built_dicom_still_reads():
    np.testing.assert_array_equal(read_image(_dicom_bytes()).array, np.arange(16, dtype=np.uint16).reshape(4, 4))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("idat", [b"not zlib at all", zlib.compress(b"\x00\x01")[:-3], b""])
def test_png_with_a_broken_pixel_stream_is_corrupt(idat):
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    with pytest.raises(CorruptFileError, match="PNG"):
        read_image(data)


# Files decoded by pydicom (uncompressed), by GDCM (RLE, JPEG lossless) and a colour one.
@pytest.mark.parametrize("name", ["693_UNCR.dcm", "MR_small_RLE.dcm", "JPEG-LL.dcm", "SC_rgb.dcm"])
def test_truncated_dicom_is_corrupt_wherever_it_is_cut(name):
    """A cut anywhere after the preamble (inside the file meta, the header, before Rows, in the pixel data) is a
    damaged image (422), never "not an image" (415)."""
    data = (PYDICOM_TEST_FILES / name if name == "MR_small_RLE.dcm" else dicom_file(name)).read_bytes()
    pixels = data.rfind(b"\xe0\x7f\x10\x00")
    cuts = [132, 140, 200, pixels // 2, pixels - 3, pixels, pixels + 10, (pixels + len(data)) // 2, len(data) - 1]
    for cut in cuts:
        with pytest.raises(
            CorruptFileError, match="^uploaded data (is a truncated|is a damaged|is not a readable|could not)"
        ):
            read_image(data[:cut])


def test_a_complete_non_image_dicom_is_still_unsupported():
    with pytest.raises(UnsupportedFormatError, match="is a Structured Report object, not an image"):
        read_image((PYDICOM_TEST_FILES / "test-SR.dcm").read_bytes())


def test_a_non_finite_frame_count_is_corrupt_without_quoting_it():
    """Fuzz case dicom 647 (truncated, then NumberOfFrames edited to inf) was a 500 from ``int(inf)``."""
    import fuzzing

    _, data = fuzzing.case("dicom", 0, 647)
    with pytest.raises(CorruptFileError, match="unreadable image size") as caught:
        read_image(data)
    assert "inf" not in str(caught.value)


def test_a_4d_nifti_of_rgb_voxels_is_refused():
    rgb = np.zeros((10, 10, 10, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(UnsupportedFormatError, match="4D NIfTI of 3-component voxels; expected scalar"):
        read_image(nib.Nifti1Image(rgb, np.eye(4)).to_bytes())
