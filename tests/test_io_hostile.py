"""Header values the readers do not expect become CorruptFileError (422), not a crash (issue 13, item 2)."""

import gzip
import struct

import nibabel as nib
import numpy as np
import pydicom
import pytest

from hub.errors import CorruptFileError
from hub.io import read_image
from io_fixtures import dicom_file


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
