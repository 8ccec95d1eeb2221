import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from transformers import AutoImageProcessor, BatchFeature

from hub.errors import InputError
from hub.io import from_array
from hub.processing import PRESETS, MedicalImageProcessor, preset
from hub.processing.channels import apply_channels, channels_first
from hub.processing.intensity import apply_intensity, normalize_spec, to_monochrome2


def _intensity(values, spec, bits=None):
    return apply_intensity(np.asarray(values), normalize_spec(spec), bits)


def test_scale01_by_bit_depth():
    np.testing.assert_allclose(_intensity([0, 819, 4095], "scale01", bits=12), [0.0, 0.2, 1.0], rtol=1e-6)
    np.testing.assert_allclose(_intensity(np.array([0, 51, 255], np.uint8), "scale01"), [0.0, 0.2, 1.0], rtol=1e-6)
    np.testing.assert_allclose(_intensity([0, 13107, 65535], {"policy": "scale01", "bits": 16}), [0.0, 0.2, 1.0])


def test_monochrome1_is_inverted_by_bit_depth_before_scaling():
    inverted = to_monochrome2(np.array([0, 51, 255]), "MONOCHROME1", 8)
    np.testing.assert_array_equal(inverted, [255, 204, 0])
    np.testing.assert_allclose(_intensity(inverted, "scale01", bits=8), [1.0, 0.8, 0.0], rtol=1e-6)
    untouched = np.array([1, 2])
    assert to_monochrome2(untouched, "MONOCHROME2", 8) is untouched
    processor = MedicalImageProcessor(in_channels=1, size=[1, 3])
    image = from_array(np.array([[0, 51, 255]], np.uint8))
    image.photometric = "MONOCHROME1"
    np.testing.assert_allclose(processor(image)["pixel_values"][0, 0, 0].numpy(), [1.0, 0.8, 0.0], rtol=1e-6)


def test_ct_window_maps_hu_bounds_to_unit_range():
    spec = {"policy": "window", "low": -1024, "high": 1024}
    np.testing.assert_allclose(_intensity([-2000, -1024, 0, 512, 1024, 3000], spec), [0, 0, 0.5, 0.75, 1, 1])
    narrow = {"policy": "window", "low": -325, "high": 325}
    np.testing.assert_allclose(_intensity([-400, -325, 0, 65, 325], narrow), [0, 0, 0.5, 0.6, 1])


def test_medcoss_ct_clip_and_divide():
    spec = {"policy": "window", "low": -1024, "high": 1024, "divide_by": 1024}
    np.testing.assert_allclose(_intensity([-3000, -512, 0, 512, 1024, 2000], spec), [-1, -0.5, 0, 0.5, 1, 1])


def test_percentile_zscore():
    # p0 = 0, p75 = 30: clipped to [0, 10, 20, 30, 30]; mean 18, std sqrt(136)
    z = _intensity([0, 10, 20, 30, 1000], {"policy": "percentile_zscore", "lower": 0, "upper": 75})
    np.testing.assert_allclose(z, (np.array([0, 10, 20, 30, 30]) - 18) / np.sqrt(136), rtol=1e-6)
    np.testing.assert_allclose(z, [-1.543487, -0.685994, 0.171499, 1.028992, 1.028992], rtol=1e-5)
    assert normalize_spec("percentile_zscore") == {"policy": "percentile_zscore", "lower": 0.2, "upper": 99.8}


def test_zscore_and_percentile_scale01():
    np.testing.assert_allclose(
        _intensity([1, 2, 3, 4], "zscore"), [-1.341641, -0.447214, 0.447214, 1.341641], rtol=1e-6
    )
    spec = {"policy": "percentile_scale01", "lower": 0, "upper": 75}
    np.testing.assert_allclose(_intensity([0, 10, 20, 30, 1000], spec), [0, 1 / 3, 2 / 3, 1, 1], rtol=1e-6)
    np.testing.assert_array_equal(_intensity([5, 0], "zscore"), [1, -1])


def test_bad_intensity_specs_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        normalize_spec({"policy": "sigmoid"})
    with pytest.raises(ValueError, match="low < high"):
        normalize_spec({"policy": "window", "low": 5, "high": 5})
    with pytest.raises(ValueError, match="no parameter"):
        normalize_spec({"policy": "zscore", "lower": 1})


def test_channel_policies():
    grey = np.array([[0.25, 0.5]], np.float32)
    repeated = apply_channels(channels_first(grey, 2), "repeat", 3)
    assert repeated.shape == (3, 1, 2)
    assert all(np.array_equal(c, grey) for c in repeated)
    rgb = channels_first(np.array([[[0.1, 0.2, 0.3]]], np.float32), 2)
    np.testing.assert_allclose(apply_channels(rgb, "bgr", 3)[:, 0, 0], [0.3, 0.2, 0.1])
    np.testing.assert_allclose(apply_channels(rgb, "rgb", 3)[:, 0, 0], [0.1, 0.2, 0.3])
    luma = 0.299 * 0.1 + 0.587 * 0.2 + 0.114 * 0.3
    np.testing.assert_allclose(apply_channels(rgb, "repeat", 1)[:, 0, 0], [luma], rtol=1e-6)
    with pytest.raises(InputError, match="5 channels"):
        apply_channels(np.zeros((5, 2, 2)), "repeat", 3)


def test_mean_std_and_resize_crop_pipeline_values():
    processor = MedicalImageProcessor(**preset("muscle"))
    image = np.full((300, 400), 255, np.uint8)
    out = processor(image)
    assert isinstance(out, BatchFeature)
    values = out["pixel_values"]
    assert values.dtype == torch.float32 and values.shape == (1, 3, 224, 224)
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(values[0, :, 100, 100].numpy(), expected, rtol=1e-5)


def test_centre_crop_takes_the_middle_and_pad_fills_zero():
    ramp = np.arange(36, dtype=np.uint8).reshape(6, 6)
    crop = MedicalImageProcessor(in_channels=1, intensity="none", size=[2, 4])(ramp, return_tensors="np")
    np.testing.assert_array_equal(crop["pixel_values"][0, 0], ramp[2:4, 1:5])
    pad = MedicalImageProcessor(in_channels=1, intensity="none", size=[8, 6])(ramp, return_tensors="np")
    np.testing.assert_array_equal(pad["pixel_values"][0, 0, 1:7], ramp)
    assert not pad["pixel_values"][0, 0, [0, 7]].any()


def test_every_input_kind_gives_the_same_pixel_values(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(grey).save(path)
    processor = MedicalImageProcessor(**preset("umedpt"))
    reference = processor(grey)["pixel_values"]
    assert reference.shape == (1, 3, 224, 224)
    for source in (
        path,
        str(path),
        path.read_bytes(),
        Image.fromarray(grey),
        sitk.GetImageFromArray(grey),
        from_array(grey),
    ):
        torch.testing.assert_close(processor(source)["pixel_values"], reference, rtol=0, atol=0)
    batch = processor([grey, path])["pixel_values"]
    assert batch.shape == (2, 3, 224, 224)
    torch.testing.assert_close(batch[1], reference[0], rtol=0, atol=0)


def test_restore_without_resize_is_exact_and_with_resize_returns_input_shape():
    ramp = np.arange(30, dtype=np.float32).reshape(5, 6)
    exact = MedicalImageProcessor(in_channels=1, intensity="none", size=[9, 4])
    prepared = exact.prepare(ramp)
    back = exact.restore(prepared.pixel_values, prepared.record)
    np.testing.assert_array_equal(back[0, :, 1:5], ramp[:, 1:5])
    assert not back[0, :, [0, 5]].any()  # columns the crop cut away come back as 0
    resized = MedicalImageProcessor(in_channels=1, intensity="none", resize=[10, 12], size=[10, 12])
    prepared = resized.prepare(np.full((5, 6), 7.0, np.float32))
    np.testing.assert_allclose(resized.restore(prepared.pixel_values, prepared.record), np.full((1, 5, 6), 7.0))


def test_3d_pipeline_shapes_and_resampling_round_trip():
    z, y, x = np.meshgrid(np.arange(8), np.arange(20), np.arange(20), indexing="ij")
    volume = (10 * z + y + x).astype(np.float32)  # linear, so linear resampling is exact inside
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((5.0, -3.0, 7.0))
    processor = MedicalImageProcessor(
        modality="ct",
        spatial_dims=3,
        in_channels=1,
        intensity="none",
        target_spacing=[1.0, 1.0, 1.0],
        size=[16, 20, 20],
    )
    prepared = processor.prepare(image)
    assert prepared.pixel_values.shape == (1, 16, 20, 20)
    np.testing.assert_allclose(prepared.pixel_values[0, 2], volume[1], atol=1e-4)  # z = 2 mm is slice 1
    np.testing.assert_allclose(prepared.pixel_values[0, 3], (volume[1] + volume[2]) / 2, atol=1e-4)
    back = processor.restore(prepared.pixel_values, prepared.record)
    assert back.shape == (1, 8, 20, 20)
    np.testing.assert_allclose(back[0], volume, atol=1e-3)
    out = processor([image, image])["pixel_values"]
    assert out.shape == (2, 1, 16, 20, 20) and out.dtype == torch.float32


def test_wrong_dimensionality_is_an_input_error():
    with pytest.raises(InputError, match="takes 3D input but got a 2D image"):
        MedicalImageProcessor(**preset("medcoss-ct"))(np.zeros((8, 8), np.int16))
    with pytest.raises(InputError, match="takes 2D input but got a 3D volume"):
        MedicalImageProcessor(**preset("muscle"))(np.zeros((4, 8, 8), np.int16))


def _everything() -> dict:
    return {
        "modality": "mri",
        "spatial_dims": 3,
        "in_channels": 2,
        "channel_policy": "repeat",
        "invert_monochrome1": False,
        "intensity": {"policy": "percentile_zscore", "lower": 1.5, "upper": 98.5},
        "image_mean": [0.1, 0.2],
        "image_std": [0.3, 0.4],
        "resize": [8, 16, 16],
        "size": [8, 12, 12],
        "target_spacing": [2.0, 0.5, 0.5],
        "orientation": "LPS",
        "tile_overlap": 0.25,
        "tile_weighting": "constant",
    }


@pytest.mark.parametrize("settings", [_everything()] + [preset(name) for name in sorted(PRESETS)])
def test_config_save_load_round_trip_is_exact(settings, tmp_path):
    processor = MedicalImageProcessor(**settings)
    processor.save_pretrained(tmp_path)
    text = (tmp_path / "preprocessor_config.json").read_text()
    saved = json.loads(text)
    assert saved["image_processor_type"] == "MedicalImageProcessor"
    for key, value in settings.items():
        assert saved[key] == (normalize_spec(value) if key == "intensity" else value)
    loaded = MedicalImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "preprocessor_config.json").read_text() == text


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="unknown setting"):
        MedicalImageProcessor(do_magic=True)
    with pytest.raises(ValueError, match="needs in_channels=3"):
        MedicalImageProcessor(channel_policy="bgr", in_channels=1)
    with pytest.raises(ValueError, match="3D processors only"):
        MedicalImageProcessor(target_spacing=1.0)


def test_auto_image_processor_loads_it_from_a_model_folder(tmp_path):
    import hub  # noqa: F401  (registers medhub's families and their processor)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "muscle"}))
    MedicalImageProcessor(**preset("muscle")).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MedicalImageProcessor
    assert loaded.to_dict() == MedicalImageProcessor(**preset("muscle")).to_dict()
    assert loaded(np.zeros((32, 32), np.uint8))["pixel_values"].shape == (1, 3, 224, 224)
