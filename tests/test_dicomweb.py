"""DICOMweb in and out against a real Orthanc (with its DICOMweb plugin) started on 127.0.0.1 for the module."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from live_server import free_port, live_server, wait_until_ready

from hub.data.phantoms import ct_volume, write_dicom_series
from hub.errors import InputError, LimitExceededError
from hub.io import ReadLimits, read_image
from hub.io.dicom_seg import (
    Algorithm,
    build_segmentation,
    dicom_bytes,
    segmentation_mask,
)
from serving.dicomweb import (
    DicomwebNotFoundError,
    DicomwebUnavailableError,
    Reference,
    fetch,
    store_result,
)

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc on free HTTP and DICOM ports, storage in a temp folder, no authentication (loopback only)."""
    if not (Path(ORTHANC).is_file() and PLUGIN.is_file()):
        message = "Orthanc or its DICOMweb plugin is missing; run scripts/install_orthanc.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("orthanc")
    http_port = free_port()
    config = {
        "Name": "medhub-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "w+") as log:
        process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{http_port}"
        try:
            wait_until_ready(url, process, root / "orthanc.log", timeout=60, path="/dicom-web/studies", name="Orthanc")
            yield {"url": url, "dicomweb": f"{url}/dicom-web", "process": process}
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


@pytest.fixture(scope="module")
def series(orthanc, tmp_path_factory) -> dict:
    """A phantom CT series uploaded to Orthanc with STOW-RS."""
    folder = write_dicom_series(
        ct_volume(np.random.default_rng(5), (5, 24, 28))["image"],
        tmp_path_factory.mktemp("upload") / "ct",
        "dicomweb-test",
        spacing=(0.9, 0.8, 3.0),
    )
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(orthanc["dicomweb"]).store_instances(datasets)
    return {
        "folder": folder,
        "study": datasets[0].StudyInstanceUID,
        "series": datasets[0].SeriesInstanceUID,
        "instances": [ds.SOPInstanceUID for ds in datasets],
    }


@pytest.mark.slow
def test_fetch_equals_the_uploaded_series(orthanc, series):
    reference = f"{series['study']}/{series['series']}"
    fetched = fetch(reference, (orthanc["dicomweb"],), None, ReadLimits())
    local = read_image(series["folder"])
    assert np.array_equal(fetched.array, local.array)
    assert fetched.geometry() == local.geometry()
    assert [ds.SOPInstanceUID for ds in fetched.dicom_headers] == [ds.SOPInstanceUID for ds in local.dicom_headers]


@pytest.mark.slow
def test_fetch_one_instance(orthanc, series):
    reference = f"{series['study']}/{series['series']}/{series['instances'][2]}"
    image = fetch(reference, (orthanc["dicomweb"],), None, ReadLimits())
    assert image.spatial_dims == 2 and image.spatial_shape == (24, 28)
    assert image.dicom_headers[0].SOPInstanceUID == series["instances"][2]


@pytest.mark.slow
def test_unknown_uid_unreachable_server_and_bad_reference(orthanc, series):
    with pytest.raises(DicomwebNotFoundError, match="no configured DICOMweb server holds"):
        fetch(f"{series['study']}/1.2.3.4", (orthanc["dicomweb"],), None, ReadLimits())
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    start = time.monotonic()
    with pytest.raises(DicomwebUnavailableError, match="could be reached"):
        fetch(f"{series['study']}/{series['series']}", (dead,), None, ReadLimits())
    assert time.monotonic() - start < 10  # one retry after 0.5 s, not dicomweb_client's default 30 s of back-off
    # a dead first server is skipped for a live second one
    assert (
        fetch(f"{series['study']}/{series['series']}", (dead, orthanc["dicomweb"]), None, ReadLimits()).spatial_dims
        == 3
    )
    for bad in ("http://evil/x", "1.2/3.4/5.6/7", "1.02/3", "../1.2/3", "1.2/" + "1" * 65):
        with pytest.raises(InputError, match="must be STUDY_UID/SERIES_UID"):
            Reference.parse(bad)


@pytest.mark.slow
def test_oversize_series_is_refused_before_pixel_data(orthanc, series):
    with pytest.raises(LimitExceededError, match="5x24x28x1 = 3360 voxels"):
        fetch(f"{series['study']}/{series['series']}", (orthanc["dicomweb"],), None, ReadLimits(max_voxels=3000))
    with pytest.raises(LimitExceededError, match="holds 5 files"):
        fetch(f"{series['study']}/{series['series']}", (orthanc["dicomweb"],), None, ReadLimits(max_files=4))


@pytest.mark.slow
def test_stored_seg_is_found_in_the_study_and_retrieved(orthanc, series):
    from dicomweb_client.api import DICOMwebClient

    image = fetch(f"{series['study']}/{series['series']}", (orthanc["dicomweb"],), None, ReadLimits())
    mask = (image.array > -300).astype(np.uint8)
    seg = build_segmentation(mask, image, ["background", "body"], Algorithm("org/model", "f" * 40))
    uid = store_result(dicom_bytes(seg), (orthanc["dicomweb"],), None)["sop_instance_uid"]
    client = DICOMwebClient(orthanc["dicomweb"])
    found = client.search_for_series(series["study"], search_filters={"Modality": "SEG"})
    assert len(found) == 1
    back = client.retrieve_instance(series["study"], found[0]["0020000E"]["Value"][0], uid)
    assert np.array_equal(segmentation_mask(back, series["instances"]), mask)


# ----- the service, reading from and storing to Orthanc ------------------------------------------------------


@pytest.fixture(scope="module")
def service(orthanc, tmp_path_factory):
    """medhub serving a tiny 3D segmenter, reading DICOMweb references from Orthanc, at most 4000 voxels."""
    import test_serving

    from hub.models.macl import MaclForSemanticSegmentation

    root = tmp_path_factory.mktemp("service")
    repo = test_serving.tiny_head_repo(
        root / "volume", MaclForSemanticSegmentation, ["background", "liver"], "macl-unet3d-tiny"
    )
    env = {
        "MEDHUB_ONNX_CACHE": str(root / "onnx"),
        "MEDHUB_THREADS": "1",
        "MEDHUB_MAX_VOXELS": "4000",
        "MEDHUB_DICOMWEB_URL": orthanc["dicomweb"],
        "MEDHUB_API_TOKEN": "",
    }
    with live_server([repo], root / "server.log", env) as live:
        yield {"url": live.url, "repo": repo}


def segment(service, **fields) -> requests.Response:
    form = {key: (None, value) for key, value in {"model": str(service["repo"]), **fields}.items()}
    return requests.post(f"{service['url']}/segment", files=form, timeout=120)


@pytest.mark.slow
def test_service_stores_the_seg_of_a_dicomweb_series(orthanc, series, service, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    from serving.models import load_served_model

    reference = f"{series['study']}/{series['series']}"
    stored = segment(service, dicomweb=reference, store="true")
    assert stored.status_code == 200, stored.text
    uids = stored.json()["stored"]
    assert uids["study_instance_uid"] == series["study"]
    client = DICOMwebClient(orthanc["dicomweb"])
    found = client.search_for_instances(
        series["study"], search_filters={"Modality": "SEG", "SOPInstanceUID": uids["sop_instance_uid"]}
    )
    assert len(found) == 1
    seg = client.retrieve_instance(series["study"], uids["series_instance_uid"], uids["sop_instance_uid"])
    nifti = segment(service, dicomweb=reference, format="nifti")
    assert nifti.status_code == 200, nifti.text
    (tmp_path / "mask.nii.gz").write_bytes(nifti.content)
    import SimpleITK as sitk

    served_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz")))
    upload_mask, _ = load_served_model(str(service["repo"]), tmp_path / "onnx", "cpu", 1).segment(
        series["folder"], ReadLimits()
    )
    assert np.array_equal(segmentation_mask(seg, series["instances"]), upload_mask)
    assert np.array_equal(served_mask, upload_mask)


@pytest.mark.slow
def test_service_errors_for_dicomweb_references(orthanc, series, service, tmp_path):
    unknown = segment(service, dicomweb=f"{series['study']}/1.2.3.4.5")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "no configured DICOMweb server holds the referenced study/series/instance"
    assert segment(service, dicomweb="http://127.0.0.1/evil").status_code == 400
    big = write_dicom_series(
        ct_volume(np.random.default_rng(6), (8, 24, 28))["image"], tmp_path / "big", "big", spacing=(1.0, 1.0, 1.0)
    )
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(path) for path in sorted(big.iterdir())]
    DICOMwebClient(orthanc["dicomweb"]).store_instances(datasets)
    oversize = segment(service, dicomweb=f"{datasets[0].StudyInstanceUID}/{datasets[0].SeriesInstanceUID}")
    assert oversize.status_code == 413
    assert "8x24x28x1 = 5376 voxels, over the limit of 4000" in oversize.json()["error"]


@pytest.mark.slow
def test_service_answers_502_when_the_server_is_gone(orthanc, series, service):
    """Last in the module: stops Orthanc."""
    orthanc["process"].terminate()
    orthanc["process"].wait(timeout=30)
    gone = segment(service, dicomweb=f"{series['study']}/{series['series']}")
    assert gone.status_code == 502
    assert gone.json()["error"] == "no configured DICOMweb server could be reached"


def test_guard_takes_a_dicomweb_reference_instead_of_a_file():
    import httpx

    from serving.middleware import form_problem

    allowed = {"file", "dicomweb", "model"}

    def problem(**fields):
        request = httpx.Request("POST", "http://127.0.0.1/segment", **fields)
        return form_problem(request.headers["content-type"].encode(), request.read(), allowed)

    assert problem(files={"dicomweb": (None, b"1.2/3.4"), "model": (None, b"org/m")}) is None
    both = problem(files={"file": ("x.dcm", b"DICM"), "dicomweb": (None, b"1.2/3.4")})
    assert both == (400, "send either an uploaded 'file' or a 'dicomweb' reference, not both")
    neither = problem(files={"model": (None, b"org/m")})
    assert neither == (
        400,
        "missing form field 'file' holding the uploaded image or volume (or a 'dicomweb' reference)",
    )
