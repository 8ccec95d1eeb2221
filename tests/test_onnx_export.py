"""ONNX export of every family's tasks (tiny presets) holds parity with torch; `bentoml build` works offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from hub.catalogue import VARIANTS
from hub.export import Provenance, export_repo
from hub.models import get_family
from serving.onnx_export import PARITY_ATOL, available_tasks, export_onnx

pytestmark = pytest.mark.slow
HEADS = {"features": "AutoModel", "classification": "AutoModelForImageClassification",
         "segmentation": "AutoModelForSemanticSegmentation"}
CASES = [
    (variant.id, task)
    for variant in VARIANTS.values()
    if variant.tiny
    for task, auto_name in HEADS.items()
    if auto_name in get_family(variant.family).auto_classes
]


@pytest.mark.parametrize(("variant_id", "task"), CASES, ids=[f"{v}-{t}" for v, t in CASES])
def test_onnx_graph_matches_torch(tmp_path, variant_id, task):
    variant = VARIANTS[variant_id]
    config = variant.build_config(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    model = get_family(variant.family).auto_classes[HEADS[task]](config)
    repo = export_repo(model, tmp_path / "repo", variant=variant.id, provenance=Provenance("trained", "test"),
                       processor=variant.build_processor(), modality=variant.modality)
    assert task in available_tasks(repo)
    result = export_onnx(repo, task, tmp_path / "model.onnx", repo_id=f"org/{variant.id}", revision="0" * 40)
    assert result.max_abs_diff <= PARITY_ATOL
    metadata = {prop.key: prop.value for prop in onnx.load(str(result.path)).metadata_props}
    assert metadata["repo_id"] == f"org/{variant.id}" and metadata["task"] == task
    assert json.loads(metadata["input_spec"])["modality"] == variant.processor_spec()["modality"]
    if task != "features":
        assert json.loads(metadata["labels"]) == {"0": "a", "1": "b"}
    batch_dim = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "the batch dimension must be dynamic"


def test_bentoml_build_succeeds_offline(tmp_path):
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    result = subprocess.run([str(bentoml), "build"], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Successfully built" in result.stdout + result.stderr
