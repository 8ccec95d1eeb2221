import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_fixtures import DICOM_DIR, MNI_T1, PYDICOM_TEST_FILES, dicom_file
from PIL import Image
from pydicom.pixels import apply_modality_lut

from hub.data.phantoms import write_dicom_series
from hub.errors import CorruptFileError, InputError, UnsupportedFormatError
from hub.io import MedicalImage, dicom, encode_mask, read_image, sniff, write_mask

# Files of pydicom-data that are refused, and why: DICOM SEG objects are not images, and one file is truncated.
REFUSED = {
    "liver.dcm": UnsupportedFormatError,
    "liver_expb.dcm": UnsupportedFormatError,
    "emri_small_jpeg_2k_lossless_too_short.dcm": CorruptFileError,
}


@pytest.mark.slow
def test_every_pydicom_data_file_reads_or_is_refused_clearly():
    files = sorted(DICOM_DIR.glob("*.dcm"))
    assert len(files) == 68
    refused = {}
    for path in files:
        try:
            image = read_image(path)
        except InputError as exc:
            refused[path.name] = type(exc)
            assert path.name in str(exc)
            continue
        assert image.array.size > 0 and image.spatial_dims in (2, 3)
        assert image.meta["format"] == "dicom"
        assert np.isfinite(image.array.astype(np.float64)).all()
    assert refused == REFUSED


def test_rg1_monochrome1_pixels_equal_pydicom_after_inversion():
    path = dicom_file("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "RescaleSlope" not in ds
    expected = (2**ds.BitsStored - 1) - ds.pixel_array.astype(np.int64)
    image = read_image(path)
    assert image.photometric == "MONOCHROME2" and image.meta["source_photometric"] == "MONOCHROME1"
    assert image.bit_depth == 15 and image.modality == "xray"
    np.testing.assert_array_equal(image.array.astype(np.int64), expected)
    np.testing.assert_array_equal(read_image(path.read_bytes()).array, image.array)


def test_ct_rescale_gives_hounsfield_units_like_pydicom():
    path = dicom_file("693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.modality == "ct" and image.meta["rescale_intercept"] == -1024.0
    np.testing.assert_array_equal(image.array, apply_modality_lut(ds.pixel_array, ds))
    assert image.spacing == pytest.approx((0.478516, 0.478516))


@pytest.mark.parametrize(
    "plain, compressed",
    [
        ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),
        ("RG1_UNCI.dcm", "RG1_J2KI.dcm"),
        ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),
        ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
        ("US1_UNCR.dcm", "US1_J2KR.dcm"),
        ("693_UNCR.dcm", "693_J2KR.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
        ("emri_small.dcm", "emri_small_RLE.dcm"),
        ("emri_small.dcm", "emri_small_big_endian.dcm"),
    ],
)
def test_compressed_twins_decode_to_identical_arrays(plain, compressed):
    a, b = read_image(dicom_file(plain)), read_image(dicom_file(compressed))
    assert a.array.dtype == b.array.dtype
    np.testing.assert_array_equal(a.array, b.array)
    assert a.geometry() == b.geometry()


def _shipped_dicom_files() -> list[Path]:
    return sorted(DICOM_DIR.glob("*.dcm")) + sorted(PYDICOM_TEST_FILES.rglob("*.dcm"))


def test_pydicom_decodes_uncompressed_greyscale_exactly_as_gdcm(monkeypatch):
    compared = []
    for path in _shipped_dicom_files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            frames, _, _, samples = dicom._declared_shape(ds, path.name)
        except InputError:
            continue
        fast = dicom._decoded_by_pydicom(str(path), ds, frames, samples, path.name)
        if fast is None:
            continue
        reference = MedicalImage.from_sitk(sitk.ReadImage(str(path), imageIO="GDCMImageIO"))
        assert fast.array.dtype == reference.array.dtype, path.name
        np.testing.assert_array_equal(fast.array, reference.array, err_msg=path.name)
        assert fast.geometry() == reference.geometry(), path.name
        compared.append(path.name)
    assert len(compared) >= 15
    assert {
        "RG1_UNCI.dcm",
        "MR2_UNCI.dcm",
        "693_UNCI.dcm",
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    } <= set(compared)
    monkeypatch.setattr(dicom, "_execute", lambda *args: pytest.fail("GDCM decoded an uncompressed greyscale file"))
    assert read_image(dicom_file("RG1_UNCI.dcm")).array.shape == (1955, 1841)


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "RG1_J2KI.dcm", "emri_small.dcm", "US1_UNCR.dcm"])
def test_palette_compressed_multiframe_and_colour_files_stay_with_gdcm(name):
    path = next(path for path in _shipped_dicom_files() if path.name == name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames, _, _, samples = dicom._declared_shape(ds, name)
    assert dicom._decoded_by_pydicom(str(path), ds, frames, samples, path.name) is None


def test_multiframe_dicom_is_a_volume():
    image = read_image(dicom_file("emri_small.dcm"))
    assert image.spatial_dims == 3 and image.array.shape == (10, 64, 64)
    ds = pydicom.dcmread(dicom_file("emri_small.dcm"))
    np.testing.assert_array_equal(image.array, ds.pixel_array)


def test_mni_template_keeps_size_spacing_origin_direction():
    image = read_image(MNI_T1)
    ref = nib.load(MNI_T1)
    assert image.size == (197, 233, 189) == ref.shape
    assert image.spacing == (1.0, 1.0, 1.0)
    lps = np.diag([-1.0, -1.0, 1.0]) @ ref.affine[:3, :]  # nibabel's RAS affine in ITK's LPS space
    assert image.origin == tuple(lps[:, 3])
    assert image.direction == tuple(lps[:, :3].ravel())
    assert image.array.dtype == np.uint8
    np.testing.assert_array_equal(image.array, np.asarray(ref.dataobj).transpose(2, 1, 0))
    same = read_image(MNI_T1.read_bytes())
    assert same.geometry() == image.geometry()


def test_dicom_series_written_from_a_volume_reads_back_with_its_geometry(tmp_path):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 2000, size=(6, 12, 10)).astype(np.int16)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    folder = write_dicom_series(hu, tmp_path / "series", "test", (0.7, 0.9, 2.5), (-10.0, 20.5, 3.0), direction)
    image = read_image(folder)
    assert image.spatial_dims == 3 and image.size == (10, 12, 6)
    assert image.spacing == pytest.approx((0.7, 0.9, 2.5))
    assert image.origin == pytest.approx((-10.0, 20.5, 3.0))
    assert image.direction == pytest.approx(direction, abs=1e-6)
    np.testing.assert_array_equal(image.array, hu)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, f in enumerate(sorted(folder.iterdir())[::-1]):  # reverse-named files still sort by position
        (shuffled / f"x{i:02d}.dcm").write_bytes(f.read_bytes())
    np.testing.assert_array_equal(read_image(shuffled).array, hu)


def test_mask_written_for_a_nifti_input_has_its_geometry(tmp_path):
    image = read_image(MNI_T1)
    mask = (image.array > 60).astype(np.uint8)
    path = write_mask(mask, image, tmp_path / "mask.nii.gz")
    back = sitk.ReadImage(str(path))
    assert back.GetSize() == image.size
    assert back.GetSpacing() == image.spacing
    assert back.GetOrigin() == image.origin
    assert back.GetDirection() == image.direction
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)
    assert read_image(encode_mask(mask, image)).geometry() == image.geometry()


def test_mask_for_a_2d_image_is_a_png_of_its_size():
    image = read_image(np.zeros((5, 7), np.uint16))
    mask = np.arange(35).reshape(5, 7) % 3
    png = encode_mask(mask, image)
    assert png.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), mask)
    with pytest.raises(InputError, match="does not match"):
        encode_mask(np.zeros((7, 5)), image)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_16_bit_grey_and_8_bit_rgb(tmp_path):
    grey = np.arange(0, 65535, 65535 // 48, dtype=np.uint16)[:48].reshape(6, 8)
    image = read_image(_png(grey))
    assert image.bit_depth == 16 and image.array.dtype == np.uint16
    np.testing.assert_array_equal(image.array, grey)
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = tmp_path / "no_extension"
    path.write_bytes(_png(rgb))
    colour = read_image(path)
    assert colour.photometric == "RGB" and colour.bit_depth == 8 and colour.channels == 3
    np.testing.assert_array_equal(colour.array, rgb)


def test_jpeg_grey_decodes_close_to_the_original():
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=95)
    image = read_image(buffer.getvalue())
    assert image.meta["format"] == "jpeg" and image.array.shape == (32, 32)
    assert np.abs(image.array.astype(int) - grey).max() <= 4


def test_pil_numpy_and_sitk_inputs_agree():
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    from_pil = read_image(Image.fromarray(grey))
    from_numpy = read_image(grey)
    itk = sitk.GetImageFromArray(grey)
    itk.SetSpacing((0.5, 2.0))
    from_itk = read_image(itk)
    for image in (from_pil, from_numpy, from_itk):
        np.testing.assert_array_equal(image.array, grey)
    assert from_itk.spacing == (0.5, 2.0) and from_numpy.spacing == (1.0, 1.0)
    assert isinstance(read_image(from_itk), MedicalImage)
    volume = read_image(np.zeros((3, 4, 5), np.float32))
    assert volume.spatial_dims == 3 and volume.size == (5, 4, 3)


def test_sniff_uses_content_not_names():
    assert sniff(_png(np.zeros((2, 2), np.uint8))) == "png"
    assert sniff(b"\xff\xd8\xff\xe0" + b"\0" * 20) == "jpeg"
    assert sniff(dicom_file("RG1_UNCI.dcm").read_bytes()[:4096]) == "dicom"
    assert sniff(dicom_file("OT-PAL-8-face.dcm").read_bytes()[:4096]) == "dicom"  # no preamble
    assert sniff(MNI_T1.read_bytes()[:4096]) == "nifti-gz"
    assert sniff(b"GIF89a" + b"\0" * 400) is None
    assert sniff(b"\x1f\x8b" + b"\0" * 30) is None
