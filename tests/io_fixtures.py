"""Paths to the real DICOM and NIfTI files that ship inside installed wheels (never downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"package {name!r} is not installed"
    return Path(spec.origin).parent


DICOM_DIR = _package_dir("data_store") / "data"
PYDICOM_TEST_FILES = _package_dir("pydicom") / "data" / "test_files"  # read directly: pydicom's lookup may go online
MNI_T1 = _package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def dicom_file(name: str) -> Path:
    path = DICOM_DIR / name
    assert path.is_file(), f"{name} is missing from pydicom-data"
    return path
