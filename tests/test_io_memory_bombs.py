"""Tiny files whose headers make the decode or the resampling allocate gigabytes are refused (issue 13, item 1),
and volumes that processing would refuse are refused from their headers, before they are decoded."""

import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from io_fixtures import PYDICOM_TEST_FILES, dicom_file

from hub.errors import LimitExceededError
from hub.io import ReadLimits, read_image
from hub.io import dicom as dicom_module
from hub.io import read as read_module
from hub.io.declared import declared_volume
from hub.processing import MedicalImageProcessor, spatial, tiling
from hub.processing.intensity import apply_intensity, normalize_spec


def _png(width: int, height: int, bit_depth: int = 8) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height", "bits"), [(50_000_000, 1, 8), (1, 50_000_000, 16), (20_000, 10, 8)])
def test_extreme_aspect_ratio_png_is_refused_before_decoding(width, height, bits):
    data = _png(width, height, bits)
    assert len(data) < 80
    tracemalloc.start()
    with pytest.raises(LimitExceededError, match="aspect ratio over the limit of 100:1") as info:
        read_image(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(info.value).startswith("uploaded data declares") and peak < 2**20


def test_aspect_ratio_at_the_limit_passes_the_check():
    ReadLimits().check_pixels((10, 1000), "image")
    ReadLimits(max_aspect_ratio=1000).check_pixels((1, 1000), "image")
    with pytest.raises(LimitExceededError, match="aspect ratio"):
        ReadLimits().check_pixels((10, 1001), "image")


def test_aspect_ratio_applies_to_arrays_too():
    with pytest.raises(LimitExceededError, match="array of shape"):
        read_image(np.zeros((1, 5000), np.uint8))


def _volume(spacing: float) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ones((2, 2, 2), np.int16))
    image.SetSpacing((spacing,) * 3)
    return image


@pytest.mark.parametrize("spacing", [1000.0, 1e300, float("inf")])
def test_resampling_to_a_grid_over_the_voxel_budget_is_refused_before_allocating(spacing):
    tracemalloc.start()
    with pytest.raises(LimitExceededError, match="over the limit of 1000000"):
        spatial.resample_spacing(_volume(spacing), (1.0, 1.0, 1.0), max_voxels=1_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20


def test_resampling_within_the_budget_keeps_values():
    out = spatial.resample_spacing(_volume(2.0), (1.0, 1.0, 1.0), max_voxels=64)
    assert out.GetSize() == (4, 4, 4)
    assert sitk.GetArrayFromImage(out)[1:3, 1:3, 1:3].tolist() == np.ones((2, 2, 2)).tolist()


def test_processor_budgets_resampling_with_the_callers_limits():
    volume = np.ones((2, 2, 2), np.int16)
    image = read_image(volume)
    image.spacing = (100.0, 100.0, 100.0)
    processor = MedicalImageProcessor(modality="ct", spatial_dims=3, in_channels=1, size=8, target_spacing=1.0)
    with pytest.raises(LimitExceededError, match="over the limit of 1000000"):
        processor.prepare(image, limits=ReadLimits(max_voxels=1_000_000))


def test_zscore_makes_no_float64_copy_of_the_volume_and_keeps_values():
    values = np.random.default_rng(0).standard_normal((16, 1024, 1024), dtype=np.float32) * 15 + 100
    expected = (values - values.mean(dtype=np.float64)) / values.std(dtype=np.float64)
    tracemalloc.start()
    out = apply_intensity(values, normalize_spec("zscore"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    assert peak < 1.25 * values.nbytes  # the float32 result and one block; a float64 copy alone would be 2x


_DAMAGED_DICOM_PEAK = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from io_fixtures import PYDICOM_TEST_FILES, dicom_file
from hub.errors import CorruptFileError
from hub.io import read_image
rle = (PYDICOM_TEST_FILES / "MR_small_RLE.dcm").read_bytes()
jpeg = dicom_file("JPEG-LL.dcm").read_bytes()
rgb = dicom_file("SC_rgb.dcm").read_bytes()
pixels = rgb.rfind(b"\\xe0\\x7f\\x10\\x00")
damaged = [
    rle[: len(rle) * 3 // 5],
    jpeg[: len(jpeg) * 3 // 5],
    rgb[: pixels + 5000] + bytes(range(256)) * 16 + rgb[pixels + 5000 :],
]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for data in damaged:
    try:
        read_image(data)
    except CorruptFileError as error:
        assert "damaged DICOM file" in str(error), error
    else:
        raise AssertionError("a damaged DICOM file was read")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_damaged_encapsulated_dicom_is_refused_before_gdcm_allocates(tmp_path):
    """An RLE or JPEG file cut inside its last fragment, or a file with bytes inserted into its pixel data (the rest
    then reads as elements of any length), made GDCM allocate 2-4 GiB before its error; they are refused before
    GDCM sees them. Measured in a child process (GDCM's memory is invisible to tracemalloc)."""
    tests = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", _DAMAGED_DICOM_PEAK, tests], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 100 * 2**20


_UNKNOWN_META_VR_GROWTH = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from io_fixtures import PYDICOM_TEST_FILES, dicom_file
from hub.errors import CorruptFileError
from hub.io import read_image
data = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
element = data.index(b"\\x02\\x00\\x03\\x00UI")  # (0002,0003) Media Storage SOP Instance UID, explicit VR
flipped = data[: element + 4] + b"EI" + data[element + 6 :]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    try:
        read_image(flipped)
    except CorruptFileError:
        pass
    else:
        raise AssertionError("a DICOM file with an unknown VR in its meta information was read")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_unknown_vr_in_the_file_meta_is_refused_before_gdcm_allocates():
    """GDCM read the length of (0002,0003) with a bit-flipped VR ("EI") from the UID's first bytes, allocated
    740 MB per read of the 10 KB file and kept them after its error (the fuzz campaign's worker grew 1.5 GB)."""
    tests = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", _UNKNOWN_META_VR_GROWTH, tests], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 100 * 2**20


def _cube(n: int) -> np.ndarray:
    return np.arange(n**3, dtype=np.int16).reshape(n, n, n)


def test_sliding_window_tiles_over_the_byte_budget_are_refused_before_allocating():
    """64^3 int16 (512 KiB) cut into 8^3 tiles at overlap 0.5 is 15^3 tiles = 6.6 MiB of float32: over a 2 MiB
    budget it is a 413 naming the tiles, and the tiles are never allocated."""
    processor = MedicalImageProcessor(modality="ct", spatial_dims=3, in_channels=1, size=8, intensity="none")
    limits = ReadLimits(max_array_bytes=2 * 2**20)
    tracemalloc.start()
    with pytest.raises(LimitExceededError, match=r"sliding-window tiles .* 6912000 bytes, over the limit of 2097152"):
        processor.tile(_cube(64), limits=limits)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 2**20
    tiled = processor.tile(_cube(64), limits=ReadLimits(max_array_bytes=8 * 2**20))
    assert tiled.tiles.shape == (3375, 1, 8, 8, 8) and tiled.tiles[0, 0, 0, 0, 1] == 1.0


def test_a_volume_whose_float32_copy_is_over_the_byte_budget_is_refused():
    processor = MedicalImageProcessor(modality="ct", spatial_dims=3, in_channels=1, size=8, intensity="none")
    with pytest.raises(LimitExceededError, match=r"float32 copy of a \(64, 64, 64\) volume .* 1048576 bytes"):
        processor.prepare(_cube(64), limits=ReadLimits(max_array_bytes=2**20 - 1))
    assert processor.prepare(_cube(64), limits=ReadLimits(max_array_bytes=2**20)).pixel_values.shape == (1, 8, 8, 8)


def test_tiles_over_the_byte_budget_are_refused_before_the_resampling_runs(monkeypatch):
    """The tile budget is checked on the resampled grid's size before sitk.Resample builds it: a 512 x 512 x 400
    volume took seconds to resample only to be refused afterwards."""
    processor = MedicalImageProcessor(
        modality="ct", spatial_dims=3, in_channels=1, size=8, intensity="none", target_spacing=[0.5, 0.5, 0.5]
    )
    image = sitk.GetImageFromArray(_cube(32))
    calls = []
    monkeypatch.setattr(spatial.sitk, "Resample", lambda *args: calls.append(args))
    with pytest.raises(LimitExceededError, match=r"sliding-window tiles of a \(64, 64, 64\) volume"):
        processor.tile(image, limits=ReadLimits(max_array_bytes=2 * 2**20))
    assert calls == []


# ----- refused from the header, before decoding ---------------------------------------------------------------

_DIRECTIONS = {
    "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "flipped": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "permuted": (0, 0, 1, 1, 0, 0, 0, -1, 0),
    "oblique": (0.8, -0.6, 0, 0.6, 0.8, 0, 0, 0, 1),
}


@pytest.mark.parametrize("direction", _DIRECTIONS.values(), ids=_DIRECTIONS.keys())
@pytest.mark.parametrize("orientation", [None, "RAS", "LPS", "SAR"])
@pytest.mark.parametrize("target", [None, (2.0, 0.7, 1.3)])
def test_the_planned_size_is_the_size_of_the_reoriented_and_resampled_volume(direction, orientation, target):
    image = sitk.GetImageFromArray(np.zeros((9, 7, 5), np.int16))
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetDirection([float(value) for value in direction])
    moved = spatial.resample_spacing(spatial.reorient(image, orientation), target)
    planned = spatial.planned_size(image.GetSize(), image.GetSpacing(), image.GetDirection(), orientation, target)
    assert planned == tuple(reversed(moved.GetSize()))


def _nifti_gz(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]) -> bytes:
    image = sitk.GetImageFromArray(np.zeros(shape, np.int16))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path.read_bytes()


def _decoding_fails(monkeypatch) -> list:
    """Make every NIfTI decode and GDCM read fail the test; returns the list of attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("the volume was decoded")

    monkeypatch.setattr(read_module.nifti, "read_nifti", refuse)
    monkeypatch.setattr(dicom_module, "_execute", refuse)
    return attempts


def test_a_nifti_whose_tiles_are_over_the_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    """160 x 128 x 96 int16 zeros (3.9 MB decoded, a few KB as .nii.gz) resampled to 2 mm and cut into 8^3 tiles at
    overlap 0.5: the same refusal as after decoding, but the voxels are never inflated or decoded."""
    data = _nifti_gz(tmp_path / "zeros.nii.gz", (96, 128, 160), (1.0, 1.0, 1.0))
    assert len(data) < 20_000
    processor = MedicalImageProcessor(
        modality="ct", spatial_dims=3, in_channels=1, size=8, intensity="none", target_spacing=[2.0, 2.0, 2.0]
    )
    limits = ReadLimits(max_array_bytes=2 * 2**20)
    with pytest.raises(LimitExceededError) as after_decoding:
        processor.tile(read_image(data), limits=limits)
    assert "sliding-window tiles of a (48, 64, 80) volume" in str(after_decoding.value)
    attempts = _decoding_fails(monkeypatch)
    for source in (data, str(tmp_path / "zeros.nii.gz")):
        with pytest.raises(LimitExceededError) as from_header:
            processor.tile(source, limits=limits)
        assert str(from_header.value) == str(after_decoding.value)
    assert attempts == []
    with pytest.raises(AssertionError, match="decoded"):  # within the budget, the volume goes on to be decoded
        processor.tile(data, limits=ReadLimits())
    assert len(attempts) == 1


def test_a_nifti_whose_float32_copy_is_over_the_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    """``prepare`` makes no tiles; its float32 copy of the resampled volume is what the header can refuse."""
    data = _nifti_gz(tmp_path / "zeros.nii.gz", (64, 64, 64), (0.5, 0.5, 0.5))
    processor = MedicalImageProcessor(
        modality="ct", spatial_dims=3, in_channels=1, size=8, intensity="none", target_spacing=[0.25, 0.5, 1.0]
    )
    attempts = _decoding_fails(monkeypatch)
    with pytest.raises(LimitExceededError, match=r"float32 copy of a \(128, 64, 32\) volume .* 1048576 bytes"):
        processor.prepare(data, limits=ReadLimits(max_array_bytes=2**20 - 1))
    assert attempts == []


@pytest.mark.parametrize(
    "path",
    [
        dicom_file("emri_small_RLE.dcm"),
        dicom_file("eCT_Supplemental.dcm"),  # GDCM's header says -10 mm between frames, the decoded volume 10 mm
        PYDICOM_TEST_FILES / "rtdose.dcm",
        PYDICOM_TEST_FILES / "SC_rgb_rle_2frame.dcm",
    ],
    ids=lambda path: path.name,
)
def test_a_multiframe_dicom_declares_the_grid_it_decodes_to(path):
    path = str(path)
    declared, image = declared_volume(path, "GDCMImageIO"), read_image(path)
    channels = (declared.channels,) if declared.channels > 1 else ()
    assert tuple(reversed(declared.size)) + channels == image.array.shape
    np.testing.assert_allclose(declared.spacing, image.spacing)


def test_a_multiframe_dicom_whose_tiles_are_over_the_budget_is_refused_before_gdcm_decodes_it(monkeypatch):
    """emri_small_RLE.dcm: 10 RLE frames of 64 x 64 in 8^3 tiles at overlap 0.5 are 2 x 15 x 15 tiles, 921,600 bytes
    of float32."""
    processor = MedicalImageProcessor(modality="mri", spatial_dims=3, in_channels=1, size=8, intensity="none")
    path = str(dicom_file("emri_small_RLE.dcm"))
    assert processor.tile(path, limits=ReadLimits(max_array_bytes=921_600)).tiles.nbytes == 921_600
    attempts = _decoding_fails(monkeypatch)
    with pytest.raises(LimitExceededError, match=r"tiles of a \(10, 64, 64\) volume .* 921600 bytes, over the limit"):
        processor.tile(path, limits=ReadLimits(max_array_bytes=921_599))
    assert attempts == []


def test_tiles_are_counted_not_listed_before_the_budget_refuses_them(tmp_path, monkeypatch):
    """1 x 32767 x 2400 voxels (343 KB as .nii.gz) in 8^3 tiles at overlap 0.5 are 4.9 million tiles: listing their
    starts took 2.5 s and 1.2 GB before the check; they are counted."""
    data = _nifti_gz(tmp_path / "thin.nii.gz", (2400, 32767, 1), (1.0, 1.0, 1.0))
    processor = MedicalImageProcessor(modality="ct", spatial_dims=3, in_channels=1, size=8, intensity="none")
    monkeypatch.setattr(tiling, "plan_tiles", lambda *args: pytest.fail("the tiles were listed"))
    with pytest.raises(LimitExceededError, match=r"4906409x1x8x8x8 values"):
        processor.tile(data)
