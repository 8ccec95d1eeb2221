"""Log canaries: patient data and client file names sent to a live server appear nowhere in its output, its
request temp dirs or BentoML's home (issue 13: no log line or temp file holds a file name or DICOM value)."""

from pathlib import Path

import httpx
import pydicom
import pytest
import test_serving
from io_fixtures import dicom_file
from pydicom import config
from test_serving import AUTH

pytestmark = pytest.mark.slow
OWN_TEMP_DIRS = True  # the server fixture then gives the server its own TMPDIR and BENTOML_HOME
repos, server = test_serving.repos, test_serving.server  # the fixtures: one live server for this module
CANARIES = ("Zanzibarqx", "Quimbletoe", "MRNQ5512086", "77441122993366", "FNAMECANARY")
NAME = "FNAMECANARY" + "n" * 300 + ".dcm"  # longer than a file name may be (ENAMETOOLONG before the guard's rewrite)


@pytest.fixture(scope="module")
def canary_dicom(tmp_path_factory) -> bytes:
    """A DICOM whose PatientName, PatientID and an IS value over its 12-character limit carry canaries (pydicom
    warns about the IS value, quoting it, when it reads the file)."""
    dataset = pydicom.dcmread(dicom_file("RG1_UNCI.dcm"))
    dataset.PatientName = "Zanzibarqx^Quimbletoe"
    dataset.PatientID = "MRNQ5512086"
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        dataset.add_new(0x00200013, "IS", "77441122993366")  # InstanceNumber
        path = tmp_path_factory.mktemp("canary") / "canary.dcm"
        dataset.save_as(path)
    finally:
        config.settings.writing_validation_mode = mode
    return path.read_bytes()


def send(server, data: bytes, name: str = NAME) -> httpx.Response:
    return httpx.post(
        f"{server['url']}/embed",
        files={"file": (name, data, "application/dicom")},
        data={"model": str(server["repos"]["classifier"])},
        headers=AUTH,
        timeout=60,
    )


def leaks(server) -> list[str]:
    """Each place (the server's output, a file or file name under its TMPDIR or BENTOML_HOME) holding a canary."""
    found = [f"log: {c}" for c in CANARIES if c in server["log"].read_text(errors="replace")]
    for root in (Path(server["tmp"]), Path(server["home"])):
        for path in root.rglob("*") if root.exists() else ():
            text = path.name + (path.read_bytes().decode("latin-1") if path.is_file() else "")
            found += [f"{path}: {c}" for c in CANARIES if c in text]
    return found


def test_a_300_character_file_name_is_served_and_never_kept(server, canary_dicom):
    response = send(server, canary_dicom)
    assert response.status_code == 200, response.text
    assert "FNAMECANARY" not in response.text
    assert not list(Path(server["tmp"]).glob("bentoml-request-*/*"))  # the upload's temp file is removed
    assert leaks(server) == []


@pytest.mark.parametrize("cut", [None, 3, 700], ids=["valid", "third", "header-only"])
def test_dicom_canaries_never_reach_the_output_or_files(server, canary_dicom, cut):
    data = canary_dicom if cut is None else canary_dicom[: len(canary_dicom) // cut if cut < 10 else cut]
    response = send(server, data)
    assert response.status_code in ((200,) if cut is None else (413, 415, 422)), response.text
    assert not any(c in response.text for c in CANARIES)
    assert httpx.get(f"{server['url']}/readyz").status_code == 200
    assert leaks(server) == []


def test_an_unexpected_exception_is_a_500_logged_once_without_its_values(tmp_path, caplog):
    from serving import service

    upload = tmp_path / "upload"
    upload.write_bytes(b"data")

    def broken(served, data):
        raise KeyError("Zanzibarqx^Quimbletoe")

    service.LOADED["org/m"] = None
    try:
        with caplog.at_level("INFO", logger="medhub.serving"):
            response = service._handle(upload, "", "org/m", broken)
    finally:
        del service.LOADED["org/m"]
    assert response.status_code == 500 and b"Zanzibarqx" not in response.body
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("unexpected KeyError at test_serving_privacy.py:"), lines
    assert not any("Zanzibarqx" in line for line in lines) and not upload.exists()  # the request's temp file is gone


def _abandoned_upload(url: str, data: bytes, sent: int) -> None:
    """A multipart /embed whose client sends the headers and ``sent`` bytes of its file, then closes the socket."""
    import socket
    import urllib.parse

    boundary = "abandonedboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\norg/model\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{NAME}"\r\n'
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    address = urllib.parse.urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /embed HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: {AUTH['Authorization']}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(head) + len(data) + len(tail)}\r\n\r\n"
            ).encode()
            + head
            + data[:sent]
        )


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_an_upload_abandoned_mid_body_leaves_no_temp_file(server, canary_dicom, fraction):
    import time

    _abandoned_upload(server["url"], canary_dicom * 4, int(len(canary_dicom) * 4 * fraction))
    deadline = time.monotonic() + 10
    while list(Path(server["tmp"]).glob("bentoml-request-*/*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(Path(server["tmp"]).glob("bentoml-request-*/*"))
    assert httpx.get(f"{server['url']}/readyz").status_code == 200
    assert leaks(server) == []
