"""Synthetic phantoms, deterministic by seed, written as real DICOM/NIfTI/PNG files plus a manifest.

Every phantom comes with ground truth that agrees with its picture by construction: chest X-rays (lungs,
heart, optional nodule -> ``nodule`` label, mask 1 = lung, 2 = nodule, the nodule's box, a report whose
finding matches the label), CT volumes in HU (mask 1 = body, 2 = liver, 3 = lesion), brain-like MRI volumes
(mask 1 = CSF, 2 = grey matter, 3 = white matter) and H&E-like pathology tiles (mask 1 = gland).
Nothing depends on time or global random state: the same seed writes the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from hub.data.manifest import ManifestRow, write_manifest

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Normalised coordinates in [-1, 1] per axis."""
    return list(np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij"))


def _ellipse(coords: list[np.ndarray], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0


def _smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(field.astype(np.float32)), sigma)
    return sitk.GetArrayFromImage(image)


# ----- pictures ------------------------------------------------------------------------------------------


def chest_xray(rng: np.random.Generator, size: int = 256, nodule: bool = False) -> dict:
    """A 12-bit frontal chest radiograph (MONOCHROME2, bright = dense) with its lung/nodule mask."""
    y, x = _grid((size, size))
    body = _ellipse([y, x], (0.05, 0.0), (0.95, 0.8))
    right = _ellipse([y, x], (-0.05, -0.38), (0.62, 0.26))  # patient's right is on the image's left
    left = _ellipse([y, x], (-0.05, 0.38), (0.62, 0.26))
    heart = _ellipse([y, x], (0.3, 0.12 + rng.uniform(-0.03, 0.03)), (0.3, 0.3 + rng.uniform(0.0, 0.08)))
    lungs = (right | left) & ~heart
    image = np.full((size, size), 300.0)
    image[body] = 2200.0
    image[lungs] = 900.0
    image[heart & body] = 2600.0
    mask = lungs.astype(np.uint8)
    box: list[float] = []
    finding = "no nodule"
    if nodule:
        inside = np.argwhere(lungs & (np.abs(y) < 0.45))
        cy, cx = inside[rng.integers(len(inside))]
        radius = float(rng.uniform(0.025, 0.05)) * size
        yy, xx = np.mgrid[:size, :size]
        spot = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[spot] += 1100.0
        mask[spot] = 2
        ys, xs = np.nonzero(spot)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        side = "right" if cx < size / 2 else "left"
        zone = "upper" if cy < size / 2 else "lower"
        finding = f"{side} {zone} zone nodule of {2 * radius * 0.4:.0f} mm"
    image = _smooth(image, 1.5) + rng.normal(0.0, 40.0, image.shape)
    pixels = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    return {
        "image": pixels,
        "mask": mask,
        "boxes": [box] if box else [],
        "labels": {"nodule": int(nodule)},
        "text": _report(nodule, finding),
    }


def varied_chest_xray(
    rng: np.random.Generator,
    size: int = 256,
    nodule: bool = False,
    contrast: float = 1500.0,
    radius: tuple[float, float] = (0.03, 0.05),
    nodules: tuple[int, int] = (2, 4),
    anatomy: float = 0.25,
    pose: float = 0.25,
) -> dict:
    """A harder radiograph than `chest_xray`: anatomy varies (body, lung and heart size and position, scaled by
    `anatomy`; a tilt and shift scaled by `pose`), acquisition varies (exposure gain and offset, blur, noise level,
    a soft-tissue gradient) and the finding is subtle: `nodules` (min, max) nodules of `radius` (fraction of the
    image side) `contrast` above the lung with a blurred edge.

    The defaults suit the tiny variants' 64 px input, where a nodule is 2-3 px across: a linear probe on a
    random-init encoder's pooled features finds the label with a test AUC of 0.74 +- 0.07 (over inits), an encoder
    trained on the label (on other phantoms) does much better, and with `anatomy` and `pose` at 1 random init is
    at chance."""
    y, x = _grid((size, size))
    tilt = pose * rng.uniform(-0.12, 0.12)
    y, x = y * np.cos(tilt) - x * np.sin(tilt), y * np.sin(tilt) + x * np.cos(tilt)
    shift = pose * rng.uniform(-0.08, 0.08, 2)
    y, x = y - shift[0], x - shift[1]

    def vary(centre: float, half_width: float) -> float:
        return centre + anatomy * rng.uniform(-half_width, half_width)

    body = _ellipse([y, x], (0.05, 0.0), (vary(0.925, 0.075), vary(0.8, 0.1)))
    lung_r = (vary(0.6, 0.1), vary(0.25, 0.05))
    gap = vary(0.38, 0.06)
    right = _ellipse([y, x], (-0.05, -gap), lung_r)
    left = _ellipse([y, x], (-0.05, gap), (lung_r[0] * vary(0.975, 0.075), lung_r[1]))
    heart = _ellipse([y, x], (0.3, vary(0.12, 0.06)), (vary(0.3, 0.05), vary(0.325, 0.075)))
    lungs = (right | left) & ~heart
    image = np.full((size, size), 300.0)
    image[body] = 2200.0 + 300.0 * y[body]
    image[lungs] = 900.0 + rng.uniform(-150, 150)
    image[heart & body] = 2600.0
    mask = lungs.astype(np.uint8)
    boxes: list[list[float]] = []
    finding = "no nodule"
    if nodule:
        inside = np.argwhere(lungs)
        yy, xx = np.mgrid[:size, :size]
        spots = []
        for _ in range(int(rng.integers(nodules[0], nodules[1] + 1))):
            cy, cx = inside[rng.integers(len(inside))]
            r = float(rng.uniform(*radius)) * size
            spot = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            image += contrast * _smooth(spot.astype(np.float32), r / 3)
            mask[spot & lungs] = 2
            ys, xs = np.nonzero(spot)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
            spots.append((cy, cx, r))
        cy, cx, r = spots[0]
        side = "right" if cx < size / 2 else "left"
        zone = "upper" if cy < size / 2 else "lower"
        finding = f"{side} {zone} zone nodule of {2 * r * 0.4:.0f} mm"
        if len(spots) > 1:
            finding += f" and {len(spots) - 1} further nodule{'s' if len(spots) > 2 else ''}"
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-200, 200)
    image = _smooth(image, rng.uniform(1.0, 2.5)) * gain + offset + rng.normal(0.0, rng.uniform(30, 90), image.shape)
    pixels = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    return {
        "image": pixels,
        "mask": mask,
        "boxes": boxes,
        "labels": {"nodule": int(nodule)},
        "text": _report(nodule, finding),
    }


def generate_varied_xrays(
    out_dir: str | Path,
    n: int = 60,
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
    progress: bool = True,
    **finding: Any,
) -> Path:
    """`n` varied X-rays (`varied_chest_xray`, `finding` its keyword arguments), alternating nodule / no nodule,
    split train / val / test by `fractions` (train, val; the rest test) with both labels in every split; returns
    the manifest path."""
    out = Path(out_dir)
    (out / "xray").mkdir(parents=True, exist_ok=True)
    n_train, n_val = int(n * fractions[0]) // 2 * 2, int(n * fractions[1]) // 2 * 2
    rows = []
    for i in tqdm(range(n), desc="varied x-rays", unit="file", disable=not progress):
        rng = np.random.default_rng([seed, 7, i])
        p = varied_chest_xray(rng, nodule=i % 2 == 1, **finding)
        name = f"varied_{i:03d}"
        write_dicom_image(p["image"], out / "xray" / f"{name}.dcm", f"{seed}-varied-{i}")
        Image.fromarray(p["mask"]).save(out / "xray" / f"{name}_mask.png")
        split = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
        rows.append(
            ManifestRow(f"xray/{name}.dcm", "xray", split, p["labels"], f"xray/{name}_mask.png", p["boxes"], p["text"])
        )
    return write_manifest(rows, out / "manifest.jsonl")


def _report(nodule: bool, finding: str) -> str:
    if nodule:
        return f"FINDINGS: There is a {finding}. Heart size is normal. IMPRESSION: Pulmonary nodule."
    return "FINDINGS: The lungs are clear. No nodule. Heart size is normal. IMPRESSION: No acute disease."


def ct_volume(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 96, 96), lesion: bool = True) -> dict:
    """An abdominal CT in HU (air, fat-tissue body, liver, optional hypodense lesion) and its mask."""
    z, y, x = _grid(shape)
    body = _ellipse([z, y, x], (0.0, 0.0, 0.0), (1.3, 0.75, 0.9))
    liver = _ellipse([z, y, x], (0.0, -0.05, -0.35), (0.8, 0.4, 0.35)) & body
    hu = np.full(shape, -1000.0)
    hu[body] = 40.0
    hu[liver] = 60.0
    mask = body.astype(np.uint8)
    mask[liver] = 2
    if lesion:
        centre = (rng.uniform(-0.3, 0.3), rng.uniform(-0.15, 0.05), rng.uniform(-0.45, -0.25))
        spot = _ellipse([z, y, x], centre, (0.25, 0.1, 0.1)) & liver
        hu[spot] = 10.0
        mask[spot] = 3
    hu = hu + rng.normal(0.0, 12.0, shape) * body
    return {
        "image": np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
        "mask": mask,
        "labels": {"lesion": int(lesion and bool((mask == 3).any()))},
    }


def mri_volume(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 64, 64)) -> dict:
    """A T1-like brain volume: white matter bright, grey matter darker, CSF dark; multiplicative bias field."""
    z, y, x = _grid(shape)
    brain = _ellipse([z, y, x], (0.0, 0.0, 0.0), (0.85, 0.85, 0.7))
    white = _ellipse([z, y, x], (0.0, 0.0, 0.0), (0.6, 0.65, 0.5))
    csf = _ellipse([z, y, x], (0.0, rng.uniform(-0.1, 0.1), 0.0), (0.25, 0.3, 0.12))
    mask = np.zeros(shape, np.uint8)
    mask[brain] = 2
    mask[white] = 3
    mask[csf] = 1
    image = np.choose(mask, [0.0, 300.0, 600.0, 900.0])
    bias = 1.0 + 0.1 * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)
    image = _smooth(image * bias, 0.7) + rng.normal(0.0, 15.0, shape) * brain
    return {"image": np.clip(image, 0, None).astype(np.float32), "mask": mask, "labels": {}}


def pathology_tile(rng: np.random.Generator, size: int = 128, glands: int = 4) -> dict:
    """An H&E-like RGB tile: pink stroma, glands as white lumens in purple nuclear rims; mask 1 = gland."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    rgb = np.empty((size, size, 3))
    rgb[:] = (232.0, 170.0, 200.0)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(glands):
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        ry, rx = rng.uniform(0.08, 0.16, 2) * size
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        rgb[(r <= 1.0) & (r > 0.45)] = (110.0, 60.0, 160.0)
        rgb[r <= 0.45] = (245.0, 240.0, 245.0)
        mask[r <= 1.0] = 1
    rgb += rng.normal(0.0, 6.0, rgb.shape)
    return {
        "image": np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
        "mask": mask,
        "labels": {"glands": int(mask.any())},
    }


# ----- files ---------------------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return generate_uid(prefix=_UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def _dicom(sop_class: str, sop_uid: str, pixels: np.ndarray) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _UID_PREFIX + "1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName, ds.PatientID = "Phantom", "PHANTOM"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_dicom_image(pixels: np.ndarray, path: Path, uid_seed: str, spacing: tuple[float, float] = (0.4, 0.4)) -> Path:
    """Write a 12-bit grey radiograph (CR, MONOCHROME2) as one DICOM file."""
    ds = _dicom(CR_STORAGE, _uid(uid_seed, "sop"), pixels)
    ds.Modality = "CR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(uid_seed, "study"), _uid(uid_seed, "series")
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(
    hu: np.ndarray,
    folder: Path,
    uid_seed: str,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> Path:
    """Write a (D, H, W) HU volume as a CT series, one file per slice (stored = HU + 1024).

    ``spacing`` and ``origin`` are in (x, y, z) order and ``direction`` is ITK's row-major matrix, so the series
    reads back with exactly this geometry.
    """
    folder.mkdir(parents=True, exist_ok=True)
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    study, series = _uid(uid_seed, "study"), _uid(uid_seed, "series")
    for k, plane in enumerate(hu):
        position = np.asarray(origin) + matrix[:, 2] * spacing[2] * k
        ds = _dicom(CT_STORAGE, _uid(uid_seed, "slice", k), (plane.astype(np.int32) + 1024).astype(np.uint16))
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = _uid(uid_seed, "frame")
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*matrix[:, 0], *matrix[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing (y), then column spacing (x)
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.save_as(folder / f"slice_{k:04d}.dcm", enforce_file_format=True)
    return folder


def write_nifti(array: np.ndarray, path: Path, spacing: tuple[float, ...]) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def _split(i: int, n: int) -> str:
    return "test" if i == n - 1 and n > 2 else ("val" if i == n - 2 and n > 2 else "train")


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_xray: int = 8,
    n_ct: int = 2,
    n_mri: int = 2,
    n_pathology: int = 4,
    progress: bool = True,
) -> Path:
    """Write every phantom kind under ``out_dir`` and return the path of its ``manifest.jsonl``.

    X-rays alternate nodule / no nodule; the first CT has no lesion so both label values occur.
    """
    out = Path(out_dir)
    for sub in ("xray", "ct", "mri", "pathology"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows: list[ManifestRow] = []
    jobs = [("xray", i, n_xray) for i in range(n_xray)] + [("ct", i, n_ct) for i in range(n_ct)]
    jobs += [("mri", i, n_mri) for i in range(n_mri)] + [("pathology", i, n_pathology) for i in range(n_pathology)]
    for kind, i, n in tqdm(jobs, desc="phantoms", unit="file", disable=not progress):
        rng = np.random.default_rng([seed, ("xray", "ct", "mri", "pathology").index(kind), i])
        name, uid_seed = f"{kind}_{i:03d}", f"{seed}-{kind}-{i}"
        if kind == "xray":
            p = chest_xray(rng, nodule=i % 2 == 1)
            write_dicom_image(p["image"], out / "xray" / f"{name}.dcm", uid_seed)
            Image.fromarray(p["mask"]).save(out / "xray" / f"{name}_mask.png")
            rows.append(
                ManifestRow(
                    f"xray/{name}.dcm",
                    "xray",
                    _split(i, n),
                    p["labels"],
                    f"xray/{name}_mask.png",
                    p["boxes"],
                    p["text"],
                )
            )
        elif kind == "ct":
            p = ct_volume(rng, lesion=i % 2 == 1)
            spacing = (0.8, 0.8, 2.5)
            write_dicom_series(p["image"], out / "ct" / name, uid_seed, spacing)
            write_nifti(p["mask"], out / "ct" / f"{name}_mask.nii.gz", spacing)
            rows.append(ManifestRow(f"ct/{name}", "ct", _split(i, n), p["labels"], f"ct/{name}_mask.nii.gz"))
        elif kind == "mri":
            p = mri_volume(rng)
            spacing = (1.0, 1.0, 1.0)
            write_nifti(p["image"], out / "mri" / f"{name}.nii.gz", spacing)
            write_nifti(p["mask"], out / "mri" / f"{name}_mask.nii.gz", spacing)
            rows.append(ManifestRow(f"mri/{name}.nii.gz", "mri", _split(i, n), {}, f"mri/{name}_mask.nii.gz"))
        else:
            p = pathology_tile(rng)
            Image.fromarray(p["image"]).save(out / "pathology" / f"{name}.png")
            Image.fromarray(p["mask"]).save(out / "pathology" / f"{name}_mask.png")
            rows.append(
                ManifestRow(
                    f"pathology/{name}.png", "pathology", _split(i, n), p["labels"], f"pathology/{name}_mask.png"
                )
            )
    return write_manifest(rows, out / "manifest.jsonl")


def digest(folder: str | Path) -> str:
    """sha256 over every file's relative path and bytes, to compare two generated trees."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
