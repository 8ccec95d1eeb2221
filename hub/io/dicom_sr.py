"""DICOM Comprehensive SR for a classification: each label's probability as a numeric measurement (TID 1500,
made with highdicom) referencing the source image, observed by the model as a device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from hub import __version__
from hub.io.dicom_seg import MANUFACTURER, Algorithm, sources
from hub.io.image import MedicalImage

LABEL_SCHEME = "99MEDHUB"  # a private coding scheme: label names are the model's own, not a standard's


def label_concept(label: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=str(label)[:16], scheme_designator=LABEL_SCHEME, meaning=str(label)[:64])


def build_classification_sr(
    probabilities: Sequence[dict[str, Any]], like: MedicalImage, algorithm: Algorithm, series_number: int = 901
) -> pydicom.Dataset:
    """A Comprehensive SR holding ``probabilities`` (``[{"label", "probability"}, ...]``, the JSON route's
    list) for ``like``'s DICOM source (its first instance for a series)."""
    source = sources(like)[0]
    reference = hd.sr.SourceImageForMeasurement(source.SOPClassUID, source.SOPInstanceUID)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.repo_id[-64:],
        version=__version__,
        parameters=[f"revision={algorithm.revision}"],
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )
    measurements = [
        hd.sr.Measurement(
            name=label_concept(item["label"]),
            value=float(item["probability"]),
            unit=codes.UCUM.NoUnits,
            referenced_images=[reference],
            algorithm_id=algorithm_id,
        )
        for item in probabilities
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="classification"),
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=algorithm.repo_id[-64:],
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.revision[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="medhub classification",
        is_complete=True,
        is_final=False,
        is_verified=False,
        software_versions=f"medhub {__version__}",
    )


def classification_from_sr(sr: pydicom.Dataset) -> list[dict[str, Any]]:
    """The ``[{"label", "probability"}, ...]`` list back from an SR made by :func:`build_classification_sr`."""
    found = []

    def walk(items: Sequence[pydicom.Dataset]) -> None:
        for item in items:
            concept = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "NUM" and concept and concept[0].CodingSchemeDesignator == LABEL_SCHEME:
                found.append(
                    {
                        "label": str(concept[0].CodeMeaning),
                        "probability": float(item.MeasuredValueSequence[0].NumericValue),
                    }
                )
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return found
