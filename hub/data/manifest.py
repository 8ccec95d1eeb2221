"""The one manifest schema for image datasets, as JSONL or CSV, with a validating loader.

Each row (a JSON object per line, or a CSV record) has:

=========  ========  ==========================================================================================
field      required  value
=========  ========  ==========================================================================================
path       yes       image file or DICOM series folder, relative to the manifest's folder (or absolute)
modality   yes       ``xray``, ``ct``, ``mri`` or ``pathology``
split      yes       ``train``, ``val`` or ``test``
labels     no        object mapping label name -> number (e.g. ``{"nodule": 1}``); default ``{}``
mask       no        label-mask file in the image's geometry (PNG for 2D, NIfTI for 3D); default none
boxes      no        list of ``[x0, y0, x1, y1]`` pixel boxes (x0 < x1, y0 < y1); default ``[]``
text       no        free-text report; default none
=========  ========  ==========================================================================================

In CSV, ``labels`` and ``boxes`` cells hold JSON text; empty cells mean the default. Rows are numbered from 1
(the CSV header is not a row), and the loader reports the first bad row by that number.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import InputError

FIELDS = ("path", "modality", "split", "labels", "mask", "boxes", "text")
MODALITIES = ("xray", "ct", "mri", "pathology")
SPLITS = ("train", "val", "test")


class ManifestError(InputError):
    """A manifest file that does not follow the schema; the message names the file and the row."""


@dataclass(frozen=True)
class ManifestRow:
    path: str
    modality: str
    split: str
    labels: dict[str, float] = field(default_factory=dict)
    mask: str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    text: str | None = None

    def resolve(self, root: Path) -> tuple[Path, Path | None]:
        """The image and mask paths, relative paths taken from ``root``."""
        return root / self.path, (root / self.mask) if self.mask else None


def _json_cell(value: Any, name: str) -> Any:
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc.msg})") from exc


def _row(raw: dict[str, Any]) -> ManifestRow:
    unknown = set(raw) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; expected {list(FIELDS)}")
    for name in ("path", "modality", "split"):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise ValueError(f"{name} is missing or empty")
    if raw["modality"] not in MODALITIES:
        raise ValueError(f"modality {raw['modality']!r} is not one of {list(MODALITIES)}")
    if raw["split"] not in SPLITS:
        raise ValueError(f"split {raw['split']!r} is not one of {list(SPLITS)}")
    labels = _json_cell(raw.get("labels"), "labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in labels.items()
    ):
        raise ValueError("labels must map label names to numbers")
    boxes = _json_cell(raw.get("boxes"), "boxes") or []
    if not isinstance(boxes, list) or not all(_valid_box(b) for b in boxes):
        raise ValueError("boxes must be a list of [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
    mask = raw.get("mask") or None
    text = raw.get("text") or None
    if mask is not None and not isinstance(mask, str):
        raise ValueError("mask must be a path")
    if text is not None and not isinstance(text, str):
        raise ValueError("text must be a string")
    return ManifestRow(
        raw["path"],
        raw["modality"],
        raw["split"],
        {k: float(v) for k, v in labels.items()},
        mask,
        [[float(v) for v in b] for b in boxes],
        text,
    )


def _valid_box(box: Any) -> bool:
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) for v in box)
        and box[0] < box[2]
        and box[1] < box[3]
    )


def _raw_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"path", "modality", "split"} - set(reader.fieldnames or ())
        if missing:
            raise ManifestError(f"manifest {path.name!r} lacks the column(s) {sorted(missing)}")
        return list(reader)
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate((ln for ln in text.splitlines() if ln.strip()), start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ManifestError(f"manifest {path.name!r} row {number}: not valid JSON ({exc.msg})") from exc
        return rows
    raise ManifestError(f"manifest {path.name!r} must be a .csv or .jsonl file")


def load_manifest(path: str | Path, check_files: bool = True) -> list[ManifestRow]:
    """Read and validate a manifest; with ``check_files`` every image and mask must exist."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {str(path)!r} does not exist")
    rows = []
    for number, raw in enumerate(_raw_rows(path), start=1):
        try:
            if not isinstance(raw, dict):
                raise ValueError("expected a JSON object")
            row = _row(raw)
        except ValueError as exc:
            raise ManifestError(f"manifest {path.name!r} row {number}: {exc}") from exc
        if check_files:
            for name, target in zip(("path", "mask"), row.resolve(path.parent)):
                if target is not None and not target.exists():
                    raise ManifestError(f"manifest {path.name!r} row {number}: {name} {str(target)!r} does not exist")
        rows.append(row)
    if not rows:
        raise ManifestError(f"manifest {path.name!r} holds no rows")
    return rows


def write_manifest(rows: list[ManifestRow], path: str | Path) -> Path:
    """Write rows as JSONL or CSV (by the suffix), in the schema's field order."""
    path = Path(path)
    records = [asdict(r) for r in rows]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, sort_keys=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for r in records:
                writer.writerow(
                    {
                        **r,
                        "labels": json.dumps(r["labels"]),
                        "boxes": json.dumps(r["boxes"]),
                        "mask": r["mask"] or "",
                        "text": r["text"] or "",
                    }
                )
    else:
        raise ManifestError(f"manifest {path.name!r} must be a .csv or .jsonl file")
    return path
