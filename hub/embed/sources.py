"""The inputs of a job: a manifest's rows, or a folder walked recursively (DICOM series folders as one volume)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from hub.data.manifest import load_manifest
from hub.io.sniff import DICOM, HEAD_BYTES, sniff


@dataclass(frozen=True)
class EmbedSource:
    id: str
    """The path relative to the manifest's folder or the walked folder (POSIX separators): stable across runs."""
    path: Path
    split: str | None = None
    labels: dict[str, float] = field(default_factory=dict)


def list_sources(data: str | Path) -> list[EmbedSource]:
    """The sources of ``data``: a manifest (.jsonl/.csv, its split and labels carried) or a folder, sorted by id."""
    data = Path(data)
    if data.is_dir():
        return sorted(_walk(data), key=lambda s: s.id)
    rows = load_manifest(data, check_files=False)
    return sorted(
        (EmbedSource(row.path, data.parent / row.path, row.split, dict(row.labels)) for row in rows), key=lambda s: s.id
    )


def _series_uid(path: str) -> str | None:
    """The SeriesInstanceUID of a DICOM file, None for any other file."""
    try:
        with open(path, "rb") as f:
            if sniff(f.read(HEAD_BYTES)) != DICOM:
                return None
        return str(
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
                "SeriesInstanceUID", ""
            )
        )
    except (OSError, pydicom.errors.InvalidDicomError):
        return None


def _walk(root: Path) -> list[EmbedSource]:
    """Every non-hidden file; a folder whose two or more DICOM files share one series is one volume instead."""
    sources = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files = sorted(f for f in files if not f.startswith("."))
        uids = {f: _series_uid(os.path.join(folder, f)) for f in files}
        dicom = [f for f, uid in uids.items() if uid is not None]
        series = len(dicom) > 1 and len({uids[f] for f in dicom}) == 1
        if series:
            sources.append(_source(root, Path(folder)))
        sources += [_source(root, Path(folder, f)) for f in files if not (series and uids[f] is not None)]
    return sources


def _source(root: Path, path: Path) -> EmbedSource:
    return EmbedSource(path.relative_to(root).as_posix(), path)
