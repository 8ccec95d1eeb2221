"""DICOMweb input and output on configured servers only: a client names UIDs, never a URL.

`fetch` finds the series on the first configured server that has it (QIDO-RS), checks the instance count and
the declared size of every instance from their metadata (WADO-RS, no pixel data) against the read limits, and
only then retrieves the instances. `store` sends a result back with STOW-RS.
"""

from __future__ import annotations

import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from hub.errors import InputError, MedhubError
from hub.io import MedicalImage, ReadLimits, read_image

UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TIMEOUT_S = 30
# dicomweb_client retries every failed request, a refused connection included, 5 times with waits of 2, 4, 8 and
# 16 s: a server that is down held each request 30 s. One retry after 0.5 s rides out a blip and lets the next
# configured server answer at once.
RETRY_ATTEMPTS = 2
RETRY_WAIT_MULTIPLIER_MS = 250  # the n-th wait is multiplier * 2**n ms


class DicomwebNotFoundError(InputError):
    """A reference to a study, series or instance no configured server holds (404)."""


class DicomwebUnavailableError(MedhubError):
    """No configured server answered (502)."""


@dataclass(frozen=True)
class Reference:
    study: str
    series: str
    instance: str | None = None

    @classmethod
    def parse(cls, value: str) -> Reference:
        """`STUDY_UID/SERIES_UID[/SOP_INSTANCE_UID]`, each a DICOM UID (digits and dots, at most 64)."""
        parts = value.strip().split("/")
        if len(parts) not in (2, 3) or not all(len(part) <= 64 and UID.match(part) for part in parts):
            raise InputError(
                "field 'dicomweb' must be STUDY_UID/SERIES_UID or STUDY_UID/SERIES_UID/SOP_INSTANCE_UID "
                "with DICOM UIDs (digits and dots, at most 64 characters)"
            )
        return cls(*parts)


def _client(url: str, token: str | None) -> DICOMwebClient:
    session = requests.Session()
    session.request = _with_timeout(session.request)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = DICOMwebClient(url, session=session, headers=headers)
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MULTIPLIER_MS)
    return client


def _with_timeout(request):
    def timed(*args, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT_S)
        return request(*args, **kwargs)

    return timed


def _value(item: dict, tag: str, default: int = 1) -> int:
    values = item.get(tag, {}).get("Value") or [default]
    return int(values[0])


def _check(metadata: list[dict], limits: ReadLimits) -> None:
    """Refuse the reference before any pixel data: instance count, declared pixels/voxels and bytes."""
    source = "the DICOMweb reference"
    limits.check_files(len(metadata), source)
    frames = rows = cols = samples = 0
    total = 0
    for item in metadata:
        f, r, c, s = (
            _value(item, "00280008"),
            _value(item, "00280010", 0),
            _value(item, "00280011", 0),
            _value(item, "00280002"),
        )
        bits = _value(item, "00280100", 16)
        frames, rows, cols, samples = frames + f, max(rows, r), max(cols, c), max(samples, s)
        total += f * r * c * s * max(bits // 8, 1)
    if len(metadata) == 1 and frames == 1:
        limits.check_pixels((rows, cols), source)
    else:
        limits.check_voxels((frames, rows, cols, samples), source)
    limits.check_bytes(total, source)


def _locate(reference: Reference, urls: tuple[str, ...], token: str | None) -> tuple[DICOMwebClient, list[dict]]:
    """The client of the first server holding the reference, and the reference's instance metadata."""
    if not urls:
        raise InputError(
            "field 'dicomweb' needs a configured DICOMweb server; this service has none (set MEDHUB_DICOMWEB_URL)"
        )
    reached = False
    for url in urls:
        client = _client(url, token)
        try:
            if reference.instance:
                metadata = client.retrieve_instance_metadata(reference.study, reference.series, reference.instance)
                metadata = [metadata]
            else:
                metadata = client.retrieve_series_metadata(reference.study, reference.series)
        except requests.HTTPError as exc:
            reached = True
            if exc.response is not None and exc.response.status_code == 404:
                continue
            raise DicomwebUnavailableError(
                "the DICOMweb server refused the metadata request "
                f"(HTTP {exc.response.status_code if exc.response is not None else '?'})"
            ) from exc
        except requests.RequestException:
            continue
        if metadata:
            return client, metadata
        reached = True
    if reached:
        raise DicomwebNotFoundError("no configured DICOMweb server holds the referenced study/series/instance")
    raise DicomwebUnavailableError("no configured DICOMweb server could be reached")


def fetch(value: str, urls: tuple[str, ...], token: str | None, limits: ReadLimits) -> MedicalImage:
    """The image or series a `dicomweb` field names, read as an upload would be, after the limit checks."""
    reference = Reference.parse(value)
    client, metadata = _locate(reference, urls, token)
    _check(metadata, limits)
    with tempfile.TemporaryDirectory(prefix="medhub-dicomweb-") as folder:
        for index, item in enumerate(metadata):
            sop = str(item["00080018"]["Value"][0])
            if not UID.match(sop):
                raise DicomwebUnavailableError("the DICOMweb server answered an invalid SOP Instance UID")
            try:
                instance = client.retrieve_instance(reference.study, reference.series, sop)
            except requests.RequestException as exc:
                raise DicomwebUnavailableError("the DICOMweb server failed while sending an instance") from exc
            instance.save_as(Path(folder) / f"{index:05d}.dcm", enforce_file_format=True)
        if len(metadata) == 1:
            return read_image(Path(folder) / "00000.dcm", limits)
        return read_image(folder, limits)


def store_result(data: bytes, urls: tuple[str, ...], token: str | None) -> dict[str, str]:
    """STOW-RS a DICOM file (a result) to the first configured server; its study, series and SOP instance UIDs."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    try:
        _client(urls[0], token).store_instances([dataset])
    except requests.RequestException as exc:
        raise DicomwebUnavailableError("the DICOMweb server did not store the result") from exc
    return {
        "study_instance_uid": str(dataset.StudyInstanceUID),
        "series_instance_uid": str(dataset.SeriesInstanceUID),
        "sop_instance_uid": str(dataset.SOPInstanceUID),
    }
