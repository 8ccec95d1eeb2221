import json

import pytest

from hub.data import ManifestError, ManifestRow, load_manifest, write_manifest
from hub.errors import InputError

ROWS = [
    ManifestRow("a.png", "xray", "train", {"nodule": 1.0}, "a_mask.png", [[1.0, 2.0, 5.0, 6.0]], "A nodule."),
    ManifestRow("vol.nii.gz", "ct", "test"),
]


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "a_mask.png", "vol.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_round_trip(folder, suffix):
    path = write_manifest(ROWS, folder / f"manifest{suffix}")
    assert load_manifest(path) == ROWS


def _jsonl(folder, records):
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"path": "a.png", "modality": "xray", "split": "train"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**GOOD, "modality": "photo"}, "modality 'photo' is not one of"),
        ({**GOOD, "split": "dev"}, "split 'dev'"),
        ({"modality": "xray", "split": "train"}, "path is missing"),
        ({**GOOD, "labels": {"nodule": "yes"}}, "labels must map"),
        ({**GOOD, "boxes": [[5, 5, 1, 1]]}, "boxes must be a list"),
        ({**GOOD, "colour": "red"}, "unknown field"),
        ({**GOOD, "path": "missing.png"}, "path .*missing.png.* does not exist"),
        ({**GOOD, "mask": "nope.png"}, "mask .*nope.png.* does not exist"),
    ],
)
def test_first_bad_row_is_reported_by_number(folder, bad, message):
    path = _jsonl(folder, [GOOD, GOOD, bad, {**GOOD, "split": "dev"}])
    with pytest.raises(ManifestError, match=f"'m.jsonl' row 3: {message}") as caught:
        load_manifest(path)
    assert isinstance(caught.value, InputError)


def test_csv_errors_name_the_row_and_bad_json(folder):
    path = folder / "m.csv"
    path.write_text('path,modality,split,labels\na.png,xray,train,{}\na.png,xray,train,{"nodule": 1\n')
    with pytest.raises(ManifestError, match="row 2: labels is not valid JSON"):
        load_manifest(path)
    (folder / "cols.csv").write_text("path,split\na.png,train\n")
    with pytest.raises(ManifestError, match=r"lacks the column\(s\) \['modality'\]"):
        load_manifest(folder / "cols.csv")


def test_broken_json_line_and_empty_manifest(folder):
    path = folder / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ManifestError, match="row 2: not valid JSON"):
        load_manifest(path)
    path.write_text("\n")
    with pytest.raises(ManifestError, match="holds no rows"):
        load_manifest(path)
    assert (
        load_manifest(_jsonl(folder, [{**GOOD, "path": "elsewhere.png"}]), check_files=False)[0].path == "elsewhere.png"
    )
