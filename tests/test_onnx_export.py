"""ONNX export of every family's tasks (tiny presets) holds parity with torch, in float32 and float16;
`bentoml build` works offline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_fixtures import CASES, fp32_graph, head_repo

from hub.catalogue import VARIANTS
from hub.models import get_family
from serving.models import load_served_model, repo_revision
from serving.onnx_export import FP16_PARITY_RTOL, PARITY_ATOL, TaskGraph, available_tasks, export_onnx
from serving.runtime import create_session

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("variant_id", "task"), CASES, ids=[f"{v}-{t}" for v, t in CASES])
def test_onnx_graph_matches_torch(built_once, variant_id, task):
    repo, result = fp32_graph(built_once, variant_id, task)  # made once: the int8 tests quantize the same graphs
    assert task in available_tasks(repo)
    assert result.max_abs_diff <= PARITY_ATOL == result.parity_limit and result.precision == "fp32"
    metadata = {prop.key: prop.value for prop in onnx.load(str(result.path)).metadata_props}
    assert metadata["repo_id"] == str(repo) and metadata["revision"] == repo_revision(repo)
    assert metadata["task"] == task and metadata["precision"] == "fp32"
    assert json.loads(metadata["input_spec"])["modality"] == VARIANTS[variant_id].processor_spec()["modality"]
    if task != "features":
        assert json.loads(metadata["labels"]) == {"0": "a", "1": "b"}
    batch_dim = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "the batch dimension must be dynamic"


def _assert_float16_graph(path: Path, model: torch.nn.Module, task: str) -> None:
    """float32 inputs and outputs, float16 weights (Resize scales may stay float32), fp16 in the metadata, and a
    new batch of 3 (the export used 2) that matches torch within the fp16 limit, but not to float32 precision."""
    graph = onnx.load(str(path))
    assert {prop.key: prop.value for prop in graph.metadata_props}["precision"] == "fp16"
    assert {value.type.tensor_type.elem_type for value in [*graph.graph.input, *graph.graph.output]} == {
        onnx.TensorProto.FLOAT
    }
    elements = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for tensor in graph.graph.initializer:
        if tensor.data_type in elements:
            elements[tensor.data_type] += int(np.prod(tensor.dims))
    assert elements[onnx.TensorProto.FLOAT16] > 100 * elements[onnx.TensorProto.FLOAT], elements
    example = get_family(model.config.model_type).example_inputs(model.config, 3, 1)["pixel_values"]
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in TaskGraph(model, task)(example)]
    actual = create_session(path, threads=1).run(None, {"pixel_values": example.numpy()})
    assert all(output.dtype == np.float32 and output.shape[0] == 3 for output in actual)
    difference = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))
    scale = max(float(np.abs(e).max()) for e in expected)
    assert PARITY_ATOL / 10 < difference <= FP16_PARITY_RTOL * max(1.0, scale)


FP16_CASES = [("umedpt-tiny", "segmentation"), ("macl-unet3d-tiny", "segmentation")]  # Swin 2D (Resize), U-Net 3D


@pytest.mark.parametrize(("variant_id", "task"), FP16_CASES, ids=[f"{v}-{t}" for v, t in FP16_CASES])
def test_fp16_graph_keeps_float32_io_and_parity(tmp_path, variant_id, task):
    torch.manual_seed(0)
    model, repo = head_repo(tmp_path, variant_id, task)
    result = export_onnx(repo, task, tmp_path / "model.onnx", repo_id=f"org/{variant_id}", revision="0" * 40, fp16=True)
    assert result.precision == "fp16" and result.parity_limit >= FP16_PARITY_RTOL
    assert result.max_abs_diff <= result.parity_limit
    _assert_float16_graph(result.path, model, task)


def test_cli_onnx_fp16_writes_a_float16_resnet(tmp_path, cli):
    torch.manual_seed(0)
    model, repo = head_repo(tmp_path, "muscle-resnet18-tiny", "features")
    result = cli("onnx", repo, "--task", "features", "--out", tmp_path / "out", "--fp16")
    assert result.code == 0, result.err
    assert "(features, fp16; outputs pooler_output, layer_0" in result.out
    difference, limit = map(float, re.search(r"max abs diff (\S+) \(limit (\S+)\)", result.out).groups())
    assert 0 < difference <= limit and limit >= FP16_PARITY_RTOL
    _assert_float16_graph(tmp_path / "out" / "model.onnx", model, "features")


def test_served_model_caches_fp16_graphs_apart_from_fp32(tmp_path):
    torch.manual_seed(0)
    model, repo = head_repo(tmp_path, "muscle-resnet18-tiny", "features")
    folder = tmp_path / "onnx" / repo_revision(repo)
    folder.mkdir(parents=True)
    (folder / "features.onnx").write_bytes(b"a float32 graph from an earlier run")
    served = load_served_model(str(repo), tmp_path / "onnx", device="cpu", threads=1, fp16=True)
    assert sorted(path.name for path in folder.glob("*.onnx")) == ["features.fp16.onnx", "features.onnx"]
    assert (folder / "features.onnx").read_bytes() == b"a float32 graph from an earlier run"
    metadata = {prop.key: prop.value for prop in onnx.load(str(folder / "features.fp16.onnx")).metadata_props}
    assert metadata["precision"] == "fp16"
    pixel_values = get_family("muscle").example_inputs(model.config, 1, 0)["pixel_values"].numpy()
    assert served.sessions["features"].run(None, {"pixel_values": pixel_values})[0].dtype == np.float32


def test_bentoml_build_succeeds_offline(tmp_path):
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    result = subprocess.run(
        [str(bentoml), "build"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Successfully built" in result.stdout + result.stderr


def test_bentofile_packages_are_the_project_dependencies():
    import tomllib

    import yaml

    root = Path(__file__).resolve().parents[1]
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    packages = yaml.safe_load((root / "bentofile.yaml").read_text())["python"]["packages"]
    assert packages == dependencies


def test_served_2d_model_on_cpu_runs_cores_plus_one_single_threaded_batches_of_two_and_lone_items_wide(tmp_path):
    from serving.runtime import default_threads

    _, repo = head_repo(tmp_path, "muscle-resnet18-tiny", "features")
    served = load_served_model(str(repo), tmp_path / "onnx", device="cpu")
    batcher, options = served.batchers["features"], served.sessions["features"].get_session_options()
    assert (batcher.workers, batcher.max_batch_size, options.intra_op_num_threads) == (default_threads() + 1, 2, 1)
    assert (batcher.solo is not None) == (default_threads() > 1)  # a lone request runs on every core
    pixel_values = np.zeros((1, 3, 64, 64), dtype=np.float32)
    if batcher.solo is not None:
        np.testing.assert_allclose(batcher.solo(pixel_values)[0], batcher.run(pixel_values)[0], atol=1e-5)
    served = load_served_model(str(repo), tmp_path / "onnx", device="cpu", threads=3, runners=1, max_batch=5)
    batcher, options = served.batchers["features"], served.sessions["features"].get_session_options()
    assert (batcher.workers, batcher.max_batch_size, options.intra_op_num_threads, batcher.solo) == (1, 5, 3, None)
