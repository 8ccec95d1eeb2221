"""DICOM SEG and SR results: the hub.io writers, validated by dciodvfy and read back with highdicom, and the
service's `format=dicom-seg` / `format=dicom-sr` answers compared with its PNG and JSON ones."""

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import test_serving
from io_fixtures import dicom_file
from PIL import Image
from test_serving import post

from hub.data.phantoms import ct_volume, write_dicom_series
from hub.errors import InputError
from hub.io import read_image
from hub.io.dicom_seg import (
    UNKNOWN_SPACING,
    Algorithm,
    build_segmentation,
    dicom_bytes,
    segmentation_mask,
)
from hub.io.dicom_sr import build_classification_sr, classification_from_sr

ALGORITHM = Algorithm("org/tiny-segmenter", "0123456789abcdef0123456789abcdef01234567")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (it is installed by the project: Debian dicom3tools)."""
    assert shutil.which("dciodvfy"), "dciodvfy is missing; install the Debian package dicom3tools"
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> Path:
    phantom = ct_volume(np.random.default_rng(3), (6, 32, 40))
    return write_dicom_series(
        phantom["image"],
        tmp_path_factory.mktemp("ct") / "series",
        "seg-test",
        spacing=(0.7, 0.8, 2.5),
        origin=(-10.0, 20.0, 5.0),
    )


def saved(ds: pydicom.Dataset, path: Path) -> Path:
    path.write_bytes(dicom_bytes(ds))
    return path


def test_series_seg_is_valid_and_reads_back_frame_by_frame(ct_series, tmp_path):
    image = read_image(ct_series)
    mask = (image.array > -300).astype(np.uint8)
    mask[:, :4] = 2
    path = saved(build_segmentation(mask, image, ["background", "body", "table"], ALGORITHM), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    uids = [ds.SOPInstanceUID for ds in image.dicom_headers]
    assert np.array_equal(segmentation_mask(seg, uids), mask)
    assert seg.StudyInstanceUID == image.dicom_headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == image.dicom_headers[0].FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == image.dicom_headers[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(uids)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["body", "table"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Organ"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == ALGORITHM.repo_id
    assert ALGORITHM.revision in str(algorithm.AlgorithmParameters)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.8, 0.7]  # row (y), column (x)
    positions = [frame.PlanePositionSequence[0].ImagePositionPatient for frame in seg.PerFrameFunctionalGroupsSequence]
    assert {tuple(float(v) for v in p) for p in positions} == {(-10.0, 20.0, 5.0 + 2.5 * k) for k in range(6)}


def test_radiograph_with_zero_spacing_gets_a_valid_seg_that_says_so(tmp_path):
    image = read_image(dicom_file("RG1_UNCI.dcm"))
    mask = np.zeros(image.spatial_shape, np.uint8)
    mask[100:400, 200:900] = 1
    path = saved(build_segmentation(mask, image, [], ALGORITHM), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    assert np.array_equal(segmentation_mask(seg, [image.dicom_headers[0].SOPInstanceUID]), mask)
    assert seg.ContentDescription == UNKNOWN_SPACING
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [1.0, 1.0]


def test_fractional_seg_and_coded_labels(ct_series, tmp_path):
    image = read_image(ct_series)
    rng = np.random.default_rng(0)
    foreground = rng.random(image.spatial_shape).astype(np.float32)
    probabilities = np.stack([1 - foreground, foreground])
    mask = (foreground > 0.5).astype(np.uint8)
    lung = {
        "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
    }
    seg = build_segmentation(mask, image, ["background", "lung"], ALGORITHM, probabilities, {"lung": lung})
    path = saved(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    back = segmentation_mask(seg, [ds.SOPInstanceUID for ds in image.dicom_headers])
    assert np.mean(back == mask) > 0.99  # 8-bit probabilities: only values within 1/255 of one half may flip


def test_non_dicom_input_and_wrong_mask_are_refused():
    image = read_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="needs a DICOM input"):
        build_segmentation(np.zeros((8, 8), np.uint8), image, [], ALGORITHM)
    radiograph = read_image(dicom_file("RG1_UNCI.dcm"))
    with pytest.raises(InputError, match="does not match"):
        build_segmentation(np.zeros((8, 8), np.uint8), radiograph, [], ALGORITHM)


def test_classification_sr_is_valid_and_reads_back(tmp_path):
    image = read_image(dicom_file("RG1_UNCI.dcm"))
    ranked = [{"label": "nodule", "probability": 0.8125}, {"label": "normal", "probability": 0.1875}]
    path = saved(build_classification_sr(ranked, image, ALGORITHM), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert classification_from_sr(sr) == ranked
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == image.dicom_headers[0].StudyInstanceUID


# ----- the service -----------------------------------------------------------------------------------------

repos, server = test_serving.repos, test_serving.server  # the served tiny models, as fixtures of this module


@pytest.mark.slow
def test_service_seg_equals_png_mask(server, tmp_path):
    data = dicom_file("RG1_UNCI.dcm").read_bytes()
    repo = str(server["repos"]["segmenter"])
    png = post(server, "segment", data, repo, format="png")
    dicom = post(server, "segment", data, repo, format="dicom-seg")
    assert png.status_code == 200 and dicom.status_code == 200, dicom.text
    assert dicom.headers["content-type"] == "application/dicom"
    expected = np.array(Image.open(io.BytesIO(png.content)))
    path = tmp_path / "seg.dcm"
    path.write_bytes(dicom.content)
    assert dciodvfy_errors(path) == []
    source = pydicom.dcmread(dicom_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    assert np.array_equal(segmentation_mask(pydicom.dcmread(path), [source.SOPInstanceUID]), expected)


@pytest.mark.slow
def test_service_sr_equals_json_route(server, tmp_path):
    data = dicom_file("RG1_UNCI.dcm").read_bytes()
    repo = str(server["repos"]["classifier"])
    labels = post(server, "classify", data, repo).json()["labels"]
    dicom = post(server, "classify", data, repo, format="dicom-sr")
    assert dicom.status_code == 200, dicom.text
    path = tmp_path / "sr.dcm"
    path.write_bytes(dicom.content)
    assert dciodvfy_errors(path) == []
    back = classification_from_sr(pydicom.dcmread(path))
    assert [item["label"] for item in back] == [item["label"] for item in labels]
    np.testing.assert_allclose(
        [item["probability"] for item in back], [item["probability"] for item in labels], rtol=1e-9, atol=1e-12
    )


@pytest.mark.slow
def test_service_refuses_dicom_seg_for_a_png(server):
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png, format="PNG")
    response = post(server, "segment", png.getvalue(), str(server["repos"]["segmenter"]), format="dicom-seg")
    assert response.status_code == 400
    assert "needs a DICOM input" in response.json()["error"]
