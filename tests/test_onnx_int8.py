"""int8 graphs: every tiny preset's tasks quantize, pass the gate and serve; the gate refuses a calibration set of
one constant image; the cache holds fp32, fp16 and int8 side by side."""

import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_fixtures import CASES, fp32_graph, head_repo  # every tiny preset's tasks
from PIL import Image

from hub.data.phantoms import write_nifti
from hub.io import ReadLimits
from hub.processing import MedicalImageProcessor
from serving.models import load_served_model, repo_revision
from serving.onnx_export import export_onnx
from serving.quantize import Gate, QuantizationGateError, dice, export_int8, gate_figure, phantom_arrays

pytestmark = pytest.mark.slow
SEGMENTATION_DICE = 0.6  # random-weight tiny segmenters: 0.74-1.0 measured


def _repo(root, variant_id: str, task: str) -> Path:
    torch.manual_seed(0)
    return head_repo(root, variant_id, task)[1]


def test_gate_figures_are_exact_on_known_values():
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    assert gate_figure("classification", reference, reference[:, ::-1]) == ("agreement", 0.0)
    assert gate_figure("classification", reference, reference * 2) == ("agreement", 1.0)
    metric, cosine = gate_figure("features", reference, reference + [[0.0, 1.0], [0, 0], [0, 0], [0, 0]])
    assert metric == "cosine" and cosine == pytest.approx(np.sqrt(0.5))
    a, b = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
    assert dice(a, b) == pytest.approx(2 * 2 / 6) and dice(np.zeros(3), np.zeros(3)) == 1.0


@pytest.mark.parametrize(("variant_id", "task"), CASES, ids=[f"{v}-{t}" for v, t in CASES])
def test_int8_graph_of_every_tiny_preset_passes_the_gate_and_serves(tmp_path, built_once, variant_id, task):
    repo, fp32 = fp32_graph(built_once, variant_id, task)  # the float32 graph the export test checked, in the cache
    processor = MedicalImageProcessor.from_pretrained(repo)
    cache = tmp_path / "cache"
    folder = cache / repo_revision(repo)
    folder.mkdir(parents=True)
    shutil.copyfile(fp32.path, folder / f"{task}.onnx")
    if task == "segmentation":
        # random heads put most pixels on the decision boundary (logits near 0), where int8 noise flips labels: the
        # default Dice gate (0.98) refuses several of them, so these go into the cache through a looser gate
        export_int8(
            repo,
            task,
            folder / f"{task}.int8.onnx",
            repo_id=str(repo),
            revision=repo_revision(repo),
            processor=processor,
            fp32_path=fp32.path,
            gate=Gate(min_dice=SEGMENTATION_DICE),
            methods=("percentile",),
        )
    served = load_served_model(str(repo), cache, device="cpu", int8=True)
    assert (folder / f"{task}.int8.onnx").is_file() and (folder / f"{task}.onnx").is_file()
    graph = onnx.load(str(folder / f"{task}.int8.onnx"))
    metadata = {prop.key: prop.value for prop in graph.metadata_props}
    assert metadata["precision"] == "int8" and metadata["task"] == task
    assert metadata["calibration"] == f"golden+phantoms:{processor.modality}"
    assert metadata["calibration_method"] in {"minmax", "entropy", "percentile"}
    assert {node.op_type for node in graph.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    reference = load_served_model(str(repo), cache, device="cpu")  # the fp32 graph of the same cache
    data, shape = _upload(tmp_path, processor)
    limits = ReadLimits()
    if task == "features":
        embedding, expected = served.embed(data, limits)["embedding"], reference.embed(data, limits)["embedding"]
        cosine = float(embedding @ expected / np.linalg.norm(embedding) / np.linalg.norm(expected))
        assert embedding.shape == expected.shape and cosine > 0.99
    elif task == "classification":
        labels = served.classify(data, limits)
        assert sum(item["probability"] for item in labels) == pytest.approx(1.0)
        assert labels[0]["label"] == reference.classify(data, limits)[0]["label"]
    else:
        mask, _ = served.segment(data, limits)
        expected_mask, _ = reference.segment(data, limits)
        assert mask.shape == shape and dice(mask, expected_mask) > SEGMENTATION_DICE


def _upload(tmp_path, processor: MedicalImageProcessor) -> tuple[bytes, tuple[int, ...]]:
    """One phantom of the model's modality as the bytes a client would send (PNG or NIfTI), and its shape."""
    image = phantom_arrays(processor.modality, processor.spatial_dims, 1)[0]
    if processor.spatial_dims == 3:
        return write_nifti(image, tmp_path / "volume.nii.gz", (1.0, 1.0, 1.0)).read_bytes(), image.shape
    if image.dtype == np.int16:  # CT slices in HU: a 16-bit PNG of HU + 1024
        image = (image.astype(np.int32) + 1024).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue(), image.shape[:2]


def test_gate_refuses_one_constant_image_and_accepts_the_real_calibration(tmp_path, cli):
    repo = _repo(tmp_path, "muscle-resnet18-tiny", "features")
    constant = tmp_path / "constant"
    constant.mkdir()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(constant / "grey.png")
    refused = cli(
        "onnx", str(repo), "--int8", "--calibration", str(constant), "--out", str(tmp_path / "bad"), "--no-progress"
    )
    assert refused.code == 1 and not (tmp_path / "bad" / "model.onnx").exists()
    assert len(refused.err.strip().splitlines()) == 1 and "cosine" in refused.err and "0.995" in refused.err
    accepted = cli("onnx", str(repo), "--int8", "--out", str(tmp_path / "good"), "--no-progress")
    assert accepted.code == 0, accepted.err
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "good" / "model.onnx")).metadata_props}
    assert float(metadata["gate_cosine"]) >= 0.995 and metadata["calibration_size"] == "16"
    # the threshold is a flag: an impossible one refuses the same, real calibration
    strict = cli(
        "onnx", str(repo), "--int8", "--min-cosine", "1.01", "--out", str(tmp_path / "strict"), "--no-progress"
    )
    assert strict.code == 1 and "1.01" in strict.err


def test_gate_refuses_a_classifier_whose_top1_moves(tmp_path):
    repo = _repo(tmp_path, "muscle-resnet18-tiny", "classification")
    processor = MedicalImageProcessor.from_pretrained(repo)
    with pytest.raises(QuantizationGateError, match="agreement"):
        export_int8(
            repo,
            "classification",
            tmp_path / "c.onnx",
            repo_id="org/c",
            revision="0" * 40,
            processor=processor,
            gate=Gate(min_agreement=1.5),
            methods=("minmax",),
        )
    assert not (tmp_path / "c.onnx").exists()


def test_cache_holds_fp32_fp16_and_int8_side_by_side(tmp_path):
    repo = _repo(tmp_path, "muscle-resnet18-tiny", "features")
    cache = tmp_path / "cache"
    for precision in ({"fp16": True}, {"int8": True}, {}):
        load_served_model(str(repo), cache, device="cpu", **precision)
    folder = cache / repo_revision(repo)
    names = sorted(path.name for path in folder.glob("*.onnx"))
    assert names == ["features.fp16.onnx", "features.int8.onnx", "features.onnx"]
    precisions = {
        name: {p.key: p.value for p in onnx.load(str(folder / name)).metadata_props}["precision"] for name in names
    }
    assert precisions == {"features.fp16.onnx": "fp16", "features.int8.onnx": "int8", "features.onnx": "fp32"}
    # weights of 7 bits (|w| <= 64) cannot saturate VPMADDUBSW on CPUs without VNNI; an int8 graph cached with 8-bit
    # weights (no `weight_bits` entry: an older medhub's) is rebuilt on load
    graph = onnx.load(str(folder / "features.int8.onnx"))
    weights = [onnx.numpy_helper.to_array(tensor) for tensor in graph.graph.initializer if tensor.data_type == 3]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    stale = [entry for entry in graph.metadata_props if entry.key != "weight_bits"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(stale)
    onnx.save(graph, str(folder / "features.int8.onnx"))
    load_served_model(str(repo), cache, device="cpu", int8=True)
    rebuilt = {p.key: p.value for p in onnx.load(str(folder / "features.int8.onnx")).metadata_props}
    assert rebuilt["weight_bits"] == "7"


def test_residual_blocks_run_in_int8_end_to_end(tmp_path):
    """Each residual Add runs as QLinearAdd and each Relu folds into its QLinearConv once ONNX Runtime has fused
    the QDQ graph: no float32 Add or Relu, and no Quantize/Dequantize pair between one block and the next."""
    repo = _repo(tmp_path, "muscle-resnet18-tiny", "features")
    revision = repo_revision(repo)
    fp32 = export_onnx(repo, "features", tmp_path / "features.onnx", repo_id=str(repo), revision=revision).path
    int8 = export_int8(
        repo,
        "features",
        tmp_path / "features.int8.onnx",
        repo_id=str(repo),
        revision=revision,
        processor=MedicalImageProcessor.from_pretrained(repo),
        fp32_path=fp32,
        methods=("minmax",),
    )
    assert int8.plan == "all"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # QDQ fusion, no layouts
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(int8.path), options, providers=["CPUExecutionProvider"])
    fused = Counter(node.op_type for node in onnx.load(str(tmp_path / "fused.onnx")).graph.node)
    original = Counter(node.op_type for node in onnx.load(str(fp32)).graph.node)
    assert fused["QLinearConv"] == original["Conv"] and fused["QLinearAdd"] == original["Add"] > 0
    assert fused["Relu"] == fused["Add"] == fused["Conv"] == 0
    assert fused["QuantizeLinear"] == 1  # the input; the outputs' DequantizeLinear feed the pooling
