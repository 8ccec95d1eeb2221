import numpy as np
import pytest
from PIL import Image

from hub.data import generate, load_manifest
from hub.data.phantoms import digest
from hub.io import read_image

COUNTS = {"n_xray": 4, "n_ct": 2, "n_mri": 1, "n_pathology": 2}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    manifest = generate(tmp_path_factory.mktemp("a"), seed=7, progress=False, **COUNTS)
    return manifest, load_manifest(manifest)


def test_same_seed_same_bytes_other_seed_other_bytes(phantoms, tmp_path):
    manifest, _ = phantoms
    again = generate(tmp_path / "b", seed=7, progress=False, **COUNTS)
    assert digest(again.parent) == digest(manifest.parent)
    other = generate(tmp_path / "c", seed=8, progress=False, **COUNTS)
    assert digest(other.parent) != digest(manifest.parent)


def test_xray_labels_masks_boxes_and_reports_agree(phantoms):
    manifest, rows = phantoms
    xrays = [r for r in rows if r.modality == "xray"]
    assert [r.labels["nodule"] for r in xrays] == [0, 1, 0, 1]
    for row in xrays:
        image = read_image(manifest.parent / row.path)
        mask = np.asarray(Image.open(manifest.parent / row.mask))
        assert image.meta["format"] == "dicom" and image.modality == "xray" and mask.shape == image.spatial_shape
        nodule = mask == 2
        assert bool(nodule.any()) == bool(row.labels["nodule"])
        assert (mask == 1).sum() > 0.1 * mask.size  # lungs are there
        assert image.array[mask == 1].mean() < image.array[mask == 0].mean()  # and darker than the body
        assert ("IMPRESSION: Pulmonary nodule" in row.text) == bool(row.labels["nodule"])
        if row.labels["nodule"]:
            ys, xs = np.nonzero(nodule)
            assert row.boxes == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
        else:
            assert row.boxes == [] and "No nodule" in row.text


def test_ct_is_in_hounsfield_units_with_matching_masks(phantoms):
    manifest, rows = phantoms
    cts = [r for r in rows if r.modality == "ct"]
    assert [r.labels["lesion"] for r in cts] == [0, 1]
    for row in cts:
        image = read_image(manifest.parent / row.path)  # a DICOM series folder
        mask = read_image(manifest.parent / row.mask)
        assert image.spacing == (0.8, 0.8, 2.5) and image.size == mask.size
        assert mask.spacing == pytest.approx(image.spacing) and mask.origin == image.origin  # NIfTI stores float32
        assert image.array[mask.array == 0].mean() == pytest.approx(-1000, abs=1)
        assert image.array[mask.array == 2].mean() == pytest.approx(60, abs=3)
        assert bool((mask.array == 3).any()) == bool(row.labels["lesion"])
        if row.labels["lesion"]:
            assert image.array[mask.array == 3].mean() == pytest.approx(10, abs=5)


def test_mri_tissue_classes_are_ordered_like_t1(phantoms):
    manifest, rows = phantoms
    (row,) = [r for r in rows if r.modality == "mri"]
    image, mask = read_image(manifest.parent / row.path), read_image(manifest.parent / row.mask)
    means = [image.array[mask.array == k].mean() for k in (0, 1, 2, 3)]
    assert means == sorted(means) and set(np.unique(mask.array)) == {0, 1, 2, 3}


def test_pathology_glands_match_their_mask(phantoms):
    manifest, rows = phantoms
    for row in (r for r in rows if r.modality == "pathology"):
        image = read_image(manifest.parent / row.path)
        mask = np.asarray(Image.open(manifest.parent / row.mask))
        assert image.photometric == "RGB" and image.array.shape == (128, 128, 3)
        assert bool(mask.any()) == bool(row.labels["glands"])
        stroma = image.array[mask == 0].mean(axis=0)
        assert stroma[0] > stroma[1]  # eosin pink: red above green


def test_phantoms_command_writes_the_kinds_and_count_asked(tmp_path, cli):
    result = cli("phantoms", "--out", str(tmp_path / "d"), "--kinds", "xray,pathology", "--count", "3", "--no-progress")
    assert result.code == 0, result.err
    rows = load_manifest(tmp_path / "d" / "manifest.jsonl")
    assert [r.modality for r in rows] == ["xray"] * 3 + ["pathology"] * 3
    assert [r.split for r in rows if r.modality == "xray"] == ["train", "val", "test"]
    assert read_image(tmp_path / "d" / rows[0].path).spatial_dims == 2
    assert str(tmp_path / "d" / "manifest.jsonl") in result.out


def test_phantoms_command_names_unknown_kinds_in_one_line(tmp_path, cli):
    result = cli("phantoms", "--out", str(tmp_path / "d"), "--kinds", "xray,ultrasound")
    assert result.code == 1 and "ultrasound" not in result.out
    assert "--kinds 'xray,ultrasound'" in result.err and len(result.err.strip().splitlines()) == 1


def test_varied_xrays_are_seeded_with_labels_masks_boxes_and_reports_that_agree(tmp_path):
    from hub.data.phantoms import generate_varied_xrays

    manifest = generate_varied_xrays(tmp_path / "a", n=10, seed=3, progress=False)
    assert digest(generate_varied_xrays(tmp_path / "b", n=10, seed=3, progress=False).parent) == digest(manifest.parent)
    rows = load_manifest(manifest)
    assert [r.split for r in rows] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert [r.labels["nodule"] for r in rows] == [0, 1] * 5
    for row in rows:
        mask = np.asarray(Image.open(manifest.parent / row.mask))
        assert bool((mask == 2).any()) == bool(row.labels["nodule"]) == bool(row.boxes)
        assert ("IMPRESSION: Pulmonary nodule" in row.text) == bool(row.labels["nodule"])
        assert 2 <= len(row.boxes) <= 4 if row.labels["nodule"] else row.boxes == []
        for x0, y0, x1, y1 in row.boxes:
            # at the tiny variants' 64 px input (256 -> 73 -> crop 64) a nodule is at least 4 px across
            assert min(x1 - x0, y1 - y0) * 73 / 256 >= 4
