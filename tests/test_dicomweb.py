"""DICOMweb in and out against a real Orthanc (with its DICOMweb plugin) started on 127.0.0.1 for the module."""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from hub.data.phantoms import ct_volume, write_dicom_series
from hub.errors import InputError, LimitExceededError
from hub.io import ReadLimits, read_image
from hub.io.dicom_seg import Algorithm, build_segmentation, segmentation_mask
from serving.dicomweb import (
    DicomwebNotFoundError,
    DicomwebUnavailableError,
    Reference,
    fetch,
    store,
)

pytestmark = pytest.mark.slow
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        "Name": "medhub-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": http_port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w+")
    process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"Orthanc exited early:\n{log.read()[-3000:]}")
        try:
            if requests.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("Orthanc did not answer in 60 s")
    yield {"url": url, "dicomweb": f"{url}/dicom-web"}
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def series(orthanc, tmp_path_factory) -> dict:
    """A phantom CT series uploaded to Orthanc with STOW-RS."""
    folder = write_dicom_series(ct_volume(np.random.default_rng(5), (5, 24, 28))["image"],
                                tmp_path_factory.mktemp("upload") / "ct", "dicomweb-test", spacing=(0.9, 0.8, 3.0))
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(orthanc["dicomweb"]).store_instances(datasets)
    return {"folder": folder, "study": datasets[0].StudyInstanceUID, "series": datasets[0].SeriesInstanceUID,
            "instances": [ds.SOPInstanceUID for ds in datasets]}


def test_fetch_equals_the_uploaded_series(orthanc, series):
    reference = f"{series['study']}/{series['series']}"
    fetched = fetch(reference, (orthanc["dicomweb"],), None, ReadLimits())
    local = read_image(series["folder"])
    assert np.array_equal(fetched.array, local.array)
    assert fetched.geometry() == local.geometry()
    assert [ds.SOPInstanceUID for ds in fetched.dicom_headers] == [ds.SOPInstanceUID for ds in local.dicom_headers]


def test_fetch_one_instance(orthanc, series):
    reference = f"{series['study']}/{series['series']}/{series['instances'][2]}"
    image = fetch(reference, (orthanc["dicomweb"],), None, ReadLimits())
    assert image.spatial_dims == 2 and image.spatial_shape == (24, 28)
    assert image.dicom_headers[0].SOPInstanceUID == series["instances"][2]


def test_unknown_uid_unreachable_server_and_bad_reference(orthanc, series):
    with pytest.raises(DicomwebNotFoundError, match="no configured DICOMweb server holds"):
        fetch(f"{series['study']}/1.2.3.4", (orthanc["dicomweb"],), None, ReadLimits())
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(DicomwebUnavailableError, match="could be reached"):
        fetch(f"{series['study']}/{series['series']}", (dead,), None, ReadLimits())
    # a dead first server is skipped for a live second one
    assert fetch(f"{series['study']}/{series['series']}", (dead, orthanc["dicomweb"]), None, ReadLimits()).spatial_dims == 3
    for bad in ("http://evil/x", "1.2/3.4/5.6/7", "1.02/3", "../1.2/3", "1.2/" + "1" * 65):
        with pytest.raises(InputError, match="must be STUDY_UID/SERIES_UID"):
            Reference.parse(bad)


def test_oversize_series_is_refused_before_pixel_data(orthanc, series):
    with pytest.raises(LimitExceededError, match="5x24x28x1 = 3360 voxels"):
        fetch(f"{series['study']}/{series['series']}", (orthanc["dicomweb"],), None, ReadLimits(max_voxels=3000))
    with pytest.raises(LimitExceededError, match="holds 5 files"):
        fetch(f"{series['study']}/{series['series']}", (orthanc["dicomweb"],), None, ReadLimits(max_files=4))


def test_stored_seg_is_found_in_the_study_and_retrieved(orthanc, series):
    from dicomweb_client.api import DICOMwebClient

    image = fetch(f"{series['study']}/{series['series']}", (orthanc["dicomweb"],), None, ReadLimits())
    mask = (image.array > -300).astype(np.uint8)
    seg = build_segmentation(mask, image, ["background", "body"], Algorithm("org/model", "f" * 40))
    uid = store(seg, (orthanc["dicomweb"],), None)
    client = DICOMwebClient(orthanc["dicomweb"])
    found = client.search_for_series(series["study"], search_filters={"Modality": "SEG"})
    assert len(found) == 1
    back = client.retrieve_instance(series["study"], found[0]["0020000E"]["Value"][0], uid)
    assert np.array_equal(segmentation_mask(back, series["instances"]), mask)
