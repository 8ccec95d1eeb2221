import numpy as np
import pytest
import SimpleITK as sitk

from hub.processing import MedicalImageProcessor, extract_tiles, plan_tiles, stitch_tiles
from hub.processing.tiling import count_tiles, tile_weight


def test_plan_covers_every_voxel_with_the_requested_overlap():
    plan = plan_tiles((10, 40, 33), (4, 16, 16), overlap=0.5)
    assert plan.padded == (10, 40, 33)
    starts = sorted({s[1] for s in plan.starts})
    assert starts == [0, 8, 16, 24]
    assert sorted({s[2] for s in plan.starts}) == [0, 8, 16, 17]
    covered = np.zeros(plan.shape, int)
    for start in plan.starts:
        covered[tuple(slice(s, s + p) for s, p in zip(start, plan.patch))] += 1
    assert covered.min() >= 1
    assert len(plan) == 4 * 4 * 4


def test_small_axes_are_padded_to_one_tile():
    plan = plan_tiles((3, 5), (8, 4), overlap=0.0)
    assert plan.padded == (8, 5) and plan.starts == ((0, 0), (0, 1))
    tiles = extract_tiles(np.ones((1, 3, 5), np.float32), plan, pad_value=-1.0)
    assert tiles.shape == (2, 1, 8, 4)
    assert (tiles[:, :, 3:] == -1).all() and (tiles[:, :, :3] == 1).all()


@pytest.mark.parametrize("weighting", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "shape, patch, overlap",
    [((13, 37, 29), (4, 16, 16), 0.5), ((5, 9, 9), (8, 8, 8), 0.75), ((6, 20, 7), (3, 6, 5), 0.3)],
)
def test_tile_then_stitch_with_identity_model_is_exact(weighting, shape, patch, overlap):
    volume = np.random.default_rng(0).normal(0, 1000, (2, *shape)).astype(np.float32)
    plan = plan_tiles(shape, patch, overlap)
    stitched = stitch_tiles(extract_tiles(volume, plan), plan, weighting)
    assert stitched.dtype == np.float32
    np.testing.assert_array_equal(stitched, volume)


def test_gaussian_weight_peaks_at_the_centre():
    weight = tile_weight((9, 9), "gaussian")
    assert weight[4, 4] == 1.0 and weight.min() > 0 and weight[0, 0] < weight[2, 2] < weight[4, 4]


def test_stitch_blends_overlaps_by_weight():
    plan = plan_tiles((1, 6), (1, 4), overlap=0.5)
    assert plan.starts == ((0, 0), (0, 2))
    tiles = np.stack([np.zeros((1, 1, 4)), np.ones((1, 1, 4))]).astype(np.float32)
    np.testing.assert_allclose(stitch_tiles(tiles, plan, "constant")[0, 0], [0, 0, 0.5, 0.5, 1, 1])


def test_processor_sliding_window_with_identity_model_reproduces_the_volume():
    volume = np.random.default_rng(1).normal(0, 500, (20, 50, 45)).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.7, 2.0))
    processor = MedicalImageProcessor(modality="ct", spatial_dims=3, in_channels=1, intensity="none", size=[8, 32, 32])
    tiled = processor.tile(image)
    assert tiled.tiles.shape[1:] == (1, 8, 32, 32) and len(tiled.tiles) == len(tiled.plan) > 1
    logits, read = processor.predict(image, lambda batch: batch, batch_size=3)
    np.testing.assert_array_equal(logits[0], volume)
    assert read.spacing == (0.7, 0.7, 2.0)


def test_sliding_window_with_resampling_returns_to_the_input_grid():
    volume = np.fromfunction(lambda z, y, x: 3 * z + y - x, (10, 24, 24), dtype=np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.5, 0.5, 2.0))
    processor = MedicalImageProcessor(
        modality="ct", spatial_dims=3, in_channels=1, intensity="none", target_spacing=[1.0, 1.0, 1.0], size=[8, 8, 8]
    )
    logits, _ = processor.predict(image, lambda batch: np.concatenate([batch, -batch], axis=1))
    assert logits.shape == (2, 10, 24, 24)
    inner = (slice(0, 9), slice(1, 23), slice(1, 23))  # linear data: exact away from the far edges
    np.testing.assert_allclose(logits[0][inner], volume[inner], atol=1e-3)
    np.testing.assert_allclose(logits[1][inner], -volume[inner], atol=1e-3)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_counted_tiles_are_the_planned_tiles(overlap):
    for shape in [(1, 1, 1), (8, 8, 8), (9, 17, 33), (3, 100, 7), (64, 1, 250)]:
        for patch in [(8, 8, 8), (4, 16, 2), (1, 1, 1)]:
            assert count_tiles(shape, patch, overlap) == len(plan_tiles(shape, patch, overlap)), (shape, patch)


def test_a_volume_resampled_to_one_slice_stays_a_volume():
    """Two 1 mm slices resampled to 3 mm are one slice: still a volume, tiled and mapped back onto both slices."""
    volume = np.full((2, 20, 20), 5.0, np.float32)
    processor = MedicalImageProcessor(
        modality="ct", spatial_dims=3, in_channels=1, intensity="none", target_spacing=[3.0, 1.0, 1.0], size=[8, 8, 8]
    )
    tiled = processor.tile(volume)
    assert tiled.plan.shape == (1, 20, 20) and tiled.tiles.shape == (16, 1, 8, 8, 8)
    logits, _ = processor.predict(volume, lambda batch: batch)
    assert logits.shape == (1, 2, 20, 20) and np.all(logits[0, :, 1:19, 1:19] == 5.0)
