"""Reading a DICOM whose header values are malformed writes none of them to a log or a warning (issue 13, item 4)."""

import logging
import warnings

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hub.io import read_image

CANARIES = ("CANARYNAME", "CANARYID", "canarycs", "73519")


def _canary_dicom(tmp_path) -> str:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "CANARYNAME^X", "CANARYID"
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", 2, 2, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.InstanceNumber = "73519.0"  # pydicom warns "Invalid value for VR IS: '73519.0'" when it reads these
        ds.BodyPartExamined = "canarycs"  # CS allows no lower case
    ds.PixelData = bytes(4)
    path = tmp_path / "canary.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_malformed_header_values_reach_no_log_or_warning(tmp_path, caplog, recwarn, capfd):
    path = _canary_dicom(tmp_path)
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # building the file logged the values; reading it must not
    recwarn.clear()
    capfd.readouterr()
    image = read_image(path)
    assert image.array.shape == (2, 2)
    assert image.meta["reader_warnings"] >= 2  # the bad IS and CS values were seen, and only counted
    out, err = capfd.readouterr()
    seen = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn] + [out, err]
    for canary in CANARIES:
        assert not any(canary in text for text in seen), canary


def test_logs_still_work_after_a_read(tmp_path, caplog):
    path = _canary_dicom(tmp_path)
    caplog.clear()
    read_image(path)
    with caplog.at_level(logging.WARNING, logger="pydicom"):
        logging.getLogger("pydicom").warning("after")
    assert [r.getMessage() for r in caplog.records] == ["after"]
    with pytest.warns(UserWarning, match="after"):
        warnings.warn("after", UserWarning, stacklevel=1)
