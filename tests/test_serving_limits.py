"""A served model applies the service's read limits to processing too (`MEDHUB_MAX_ARRAY_MB`), not only to the
read: a volume whose sliding-window tiles are over the service's array budget is refused."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hub.catalogue import get_variant
from hub.errors import LimitExceededError
from hub.export import Provenance, export_repo
from hub.io import ReadLimits
from hub.io import read as read_module
from hub.models.macl import MaclForSemanticSegmentation
from serving.models import load_served_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    variant = get_variant("macl-unet3d-tiny")
    config = variant.build_config(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    torch.manual_seed(0)
    repo = export_repo(
        MaclForSemanticSegmentation(config),
        root / "volume",
        variant=variant.id,
        provenance=Provenance("random-init", "test"),
        processor=variant.build_processor(),
        modality=variant.modality,
    )
    return load_served_model(str(repo), root / "onnx", "cpu", 1)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("volume") / "volume.nii.gz"
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 200, (40, 40, 40)).astype(np.int16))
    sitk.WriteImage(image, str(path))
    return str(path)


def test_the_array_budget_of_the_limits_reaches_processing(served, volume):
    tiles = served.processor.tile(volume).tiles
    fits = ReadLimits(max_array_bytes=tiles.nbytes)
    np.testing.assert_allclose(served.embed(volume, fits)["embedding"], served.embed(volume, ReadLimits())["embedding"])
    mask, _ = served.segment(volume, fits)
    assert mask.shape == (40, 40, 40)
    tight = ReadLimits(max_array_bytes=tiles.nbytes - 1)
    for run in (served.embed, served.segment):
        with pytest.raises(LimitExceededError, match="sliding-window tiles"):
            run(volume, tight)


def test_an_upload_over_the_array_budget_is_refused_from_its_header(served, volume, monkeypatch):
    """The same refusal as above for the bytes of an upload, before the NIfTI is inflated or decoded."""
    tight = ReadLimits(max_array_bytes=served.processor.tile(volume).tiles.nbytes - 1)
    data = Path(volume).read_bytes()
    decoded = []
    monkeypatch.setattr(read_module.nifti, "read_nifti", lambda *args: decoded.append(args))
    for run in (served.embed, served.segment):
        with pytest.raises(LimitExceededError, match=r"sliding-window tiles of a \(40, 40, 40\) volume"):
            run(data, tight)
    assert decoded == []
