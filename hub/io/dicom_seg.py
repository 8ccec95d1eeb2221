"""DICOM Segmentation (SEG) objects for a mask predicted on a DICOM image or series, made with highdicom.

The SEG references the source study, series and every source SOP instance, carries the source's frame of
reference and geometry, one segment per foreground label and the algorithm that made it (model repo id,
revision sha, medhub version).

Missing or zero pixel spacing (e.g. the radiograph RG1_UNCI.dcm declares ``0\\0``): the SEG's Pixel Measures
say 1 mm, the unit spacing the reader reports and the NIfTI/PNG results carry, and its Content Description says
that the spacing is unknown, so that no viewer mistakes the 1 mm for a measurement. A source without a
Slice Thickness (a projection radiograph) gets 1 mm there, which the Pixel Measures need to be read back.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from hub import __version__
from hub.errors import InputError
from hub.io.image import MedicalImage

GENERIC_CATEGORY = codes.SCT.Tissue
GENERIC_TYPE = codes.SCT.Organ
UNKNOWN_SPACING = "pixel spacing unknown: the source declares none; 1 mm assumed"
MANUFACTURER = "medhub"


@dataclass(frozen=True)
class Algorithm:
    """What made a result: the model repo id and revision sha (the medhub version is added by the writers)."""

    repo_id: str
    revision: str

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.repo_id[-64:],
            family=codes.cid7162.ArtificialIntelligence,
            version=__version__,
            parameters={"revision": self.revision},
        )


def _code(spec: Any, where: str) -> hd.sr.CodedConcept:
    try:
        return hd.sr.CodedConcept(
            value=str(spec["value"]), scheme_designator=str(spec["scheme"]), meaning=str(spec["meaning"])
        )
    except (KeyError, TypeError) as exc:
        raise InputError(f"{where} must be an object with value, scheme and meaning") from exc


def segment_descriptions(
    labels: Sequence[str], algorithm: Algorithm, label_codes: Mapping[str, Any] | None = None
) -> list[hd.seg.SegmentDescription]:
    """One segment per foreground label (labels[1:]); codes from ``label_codes[label]`` (``category`` and
    ``type``, each ``{"value", "scheme", "meaning"}``) where given, generic Tissue / Organ otherwise."""
    label_codes = label_codes or {}
    segments = []
    for number, label in enumerate(labels[1:], start=1):
        spec = label_codes.get(label) or {}
        category = _code(spec["category"], f"the code of {label!r}") if "category" in spec else GENERIC_CATEGORY
        kind = _code(spec["type"], f"the code of {label!r}") if "type" in spec else GENERIC_TYPE
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(label)[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm.identification(),
            )
        )
    return segments


# Type 2 patient and study attributes the derived object copies: sources may lack them (they may be empty).
_COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def sources(like: MedicalImage) -> list[pydicom.Dataset]:
    """Copies of ``like``'s source DICOM headers, one per slice in array order, with absent Type 2 patient and
    study attributes added empty (a derived object copies them); an error for non-DICOM inputs."""
    if not like.dicom_headers:
        raise InputError("a DICOM SEG or SR needs a DICOM input; expected a DICOM file or series")
    headers = []
    for header in like.dicom_headers:
        header = copy.deepcopy(header)
        for keyword in _COPIED_TYPE2:
            if keyword not in header:
                setattr(header, keyword, None)
        headers.append(header)
    return headers


def _has_spacing(ds: pydicom.Dataset) -> bool:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        return spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing)
    except (TypeError, ValueError):
        return False


def _pixel_measures(like: MedicalImage, first: pydicom.Dataset) -> hd.PixelMeasuresSequence:
    row, column = like.spacing[1], like.spacing[0]  # (x, y) -> DICOM's row spacing (y), column spacing (x)
    thickness = first.get("SliceThickness")
    try:
        thickness = float(thickness) if thickness not in (None, "") and float(thickness) > 0 else None
    except (TypeError, ValueError):
        thickness = None
    if thickness is None:  # a projection radiograph has none; highdicom cannot read a SEG back without it
        thickness = like.spacing[2] if like.spatial_dims == 3 else 1.0
    return hd.PixelMeasuresSequence(pixel_spacing=(row, column), slice_thickness=thickness)


def build_segmentation(
    mask: np.ndarray,
    like: MedicalImage,
    labels: Sequence[str],
    algorithm: Algorithm,
    probabilities: np.ndarray | None = None,
    label_codes: Mapping[str, Any] | None = None,
    series_number: int = 900,
) -> pydicom.Dataset:
    """A SEG for ``mask`` (labels 0..K-1 on ``like``'s grid, 0 = background) over ``like``'s DICOM sources.

    Binary by default: segment ``k`` holds ``mask == k``. With ``probabilities`` (K, *spatial) in [0, 1] the SEG
    is fractional (probability, 8-bit) for segments 1..K-1.
    """
    headers = sources(like)
    mask = np.asarray(mask)
    if mask.shape != like.spatial_shape:
        raise InputError(f"mask of shape {mask.shape} does not match the image's spatial shape {like.spatial_shape}")
    labels = list(labels) or ["background", "foreground"]
    if mask.size and int(mask.max()) >= len(labels):
        raise InputError(f"mask holds label {int(mask.max())} but only {len(labels)} labels are named")
    if probabilities is None:
        kind = hd.seg.SegmentationTypeValues.BINARY
        pixels = mask.astype(np.uint16 if len(labels) > 255 else np.uint8)
    else:
        probabilities = np.asarray(probabilities, dtype=np.float32)
        if probabilities.shape != (len(labels), *like.spatial_shape):
            raise InputError(
                f"probabilities of shape {probabilities.shape} do not match {len(labels)} labels "
                f"on the image's grid {like.spatial_shape}"
            )
        kind = hd.seg.SegmentationTypeValues.FRACTIONAL
        pixels = np.moveaxis(np.clip(probabilities[1:], 0.0, 1.0), 0, -1)  # (*spatial, segments)
    if like.spatial_dims == 2:
        pixels = pixels[None]
    if pixels.shape[0] != len(headers):
        raise InputError(f"the mask has {pixels.shape[0]} slices but the DICOM source {len(headers)} instances")
    spaced = all(_has_spacing(ds) for ds in headers)
    first = headers[0]
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=segment_descriptions(labels, algorithm, label_codes),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.repo_id[-64:],
        software_versions=f"medhub {__version__}",
        device_serial_number=algorithm.revision[:64],
        series_description="medhub segmentation",
        content_description=None if spaced else UNKNOWN_SPACING,
        content_label="MEDHUB_SEG",
        pixel_measures=None if spaced and "FrameOfReferenceUID" in first else _pixel_measures(like, first),
        omit_empty_frames=False,
        max_fractional_value=255,
    )
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        seg.PatientOrientation = None  # Type 2C without a frame of reference; the source may not say it
    return seg


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def segmentation_mask(seg: pydicom.Dataset, source_uids: Sequence[str]) -> np.ndarray:
    """A SEG read back as a label mask over the source instances ``source_uids`` in that order: (rows, cols)
    for one, else (frames, rows, cols); a voxel holds the highest segment number covering it (fractional:
    probability above one half)."""
    seg = hd.seg.Segmentation.from_dataset(seg, copy=True)
    volume = seg.get_pixels_by_source_instance(
        list(source_uids), combine_segments=False, assert_missing_frames_are_empty=True
    )
    if volume.dtype.kind == "f":
        volume = volume > 0.5
    numbers = np.arange(1, volume.shape[-1] + 1)
    labels = (volume.astype(bool) * numbers).max(axis=-1).astype(np.uint8 if numbers.size < 256 else np.uint16)
    return labels[0] if labels.shape[0] == 1 else labels
