"""int8 ONNX graphs: ONNX Runtime static quantization (QDQ, per-channel weights) calibrated on inputs the repo's
own processor prepares, with an accuracy gate against the float32 graph.

Calibration inputs default to the repo's golden input plus synthetic phantoms of its modality
(`hub.data.phantoms`); a manifest or a folder of images may replace the phantoms. Each calibration method
(MinMax, entropy, percentile) is tried and the one closest to float32 is kept. The gate compares int8 with
float32 on the calibration inputs plus the default reference inputs (golden + phantoms), so that a calibration set
unlike real images (one constant image) cannot pass by fitting only itself.
"""

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from safetensors.numpy import load_file
from tqdm import tqdm

from hub.data.manifest import load_manifest
from hub.data.phantoms import chest_xray, ct_volume, mri_volume, pathology_tile
from hub.errors import InputError, MedhubError
from hub.export.resolve import read_config
from hub.processing import MedicalImageProcessor

from .onnx_export import ExportError, export_onnx, write_metadata
from .runtime import create_session

logger = logging.getLogger("medhub.serving")
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# Conv / MatMul / Gemm carry the compute. A residual block's Add and Relu and the pooling are quantized too: left in
# float32 they put a DequantizeLinear / QuantizeLinear pair on every block's output (ResNet-50: 34 Q and 39 DQ nodes
# in the optimized graph against 1 and 6), and ONNX Runtime then runs the Add as QLinearAdd and folds each Relu into
# its QLinearConv (ResNet-50 int8 about 10% faster; see benchmarks/bench_serving.py). Normalisations, softmax and
# GELU stay float32. Segmentation graphs quantize only the compute ops: a decoder's skip-connection Adds carry
# per-pixel logits near the decision boundary (umedpt-tiny's random segmenter: Dice 0 to float32 on a phantom with
# them quantized).
COMPUTE_OPS = ["Conv", "MatMul", "Gemm"]
QUANTIZED_OPS = [*COMPUTE_OPS, "Add", "Relu", "MaxPool", "GlobalAveragePool"]
DEFAULT_CALIBRATION_SIZE = 16
# x86 CPUs without VNNI (AVX2, AVX-512F alone) multiply uint8 activations by int8 weights with VPMADDUBSW, which
# sums two products into int16 and saturates past 32767 (255 * 127 * 2 = 64770): umedpt-tiny's features fell to
# cosine 0.90 to float32 on an AVX2 EPYC while passing on an AVX-512 VNNI one. Weights quantized to 7 bits
# (255 * 64 * 2 = 32640) cannot saturate, so a graph gives the same answers on every CPU it is served on.
WEIGHT_BITS = 7
GOLDEN_INPUT = "pixel_values"


class QuantizationGateError(ExportError):
    """An int8 graph that strays too far from its float32 graph."""


@dataclass(frozen=True)
class Gate:
    """Minimum agreement of int8 with float32: pooled-feature cosine (features), top-1 agreement
    (classification), Dice of the masks (segmentation)."""

    min_cosine: float = 0.995
    min_agreement: float = 0.99
    min_dice: float = 0.98


@dataclass
class Int8Export:
    path: Path
    task: str
    method: str
    plan: str  # "all" (every node of QUANTIZED_OPS quantized) or "fp32-edges" (see `sensitive_nodes`)
    calibration: str
    calibration_size: int
    metric: str  # cosine, agreement or dice
    value: float  # the gated figure of the kept method (minimum cosine over inputs, agreement or Dice)
    cosine: float  # the mean cosine of the first output over the gate's inputs
    per_method: dict[str, float] = field(default_factory=dict)  # "plan/method" -> the gated figure


class _Reader(CalibrationDataReader):
    def __init__(self, inputs: np.ndarray):
        self.items: Iterator[np.ndarray] = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.items, None)
        return None if item is None else {GOLDEN_INPUT: item[None]}


def phantom_arrays(modality: str, spatial_dims: int, count: int) -> list[np.ndarray]:
    """`count` synthetic images of `modality` (2D models of volume modalities get axial slices), deterministic."""
    arrays: list[np.ndarray] = []
    index = 0
    while len(arrays) < count:
        rng = np.random.default_rng([17, index])
        if modality == "xray":
            pictures = [chest_xray(rng, nodule=index % 2 == 1)["image"]]
        elif modality == "pathology":
            pictures = [pathology_tile(rng)["image"]]
        else:
            volume = (ct_volume(rng, lesion=index % 2 == 1) if modality == "ct" else mri_volume(rng))["image"]
            middle = volume.shape[0] // 2
            pictures = [volume] if spatial_dims == 3 else [volume[middle + step] for step in (-4, 0, 4)]
        arrays.extend(pictures)
        index += 1
    return arrays[:count]


def reference_inputs(repo_dir: Path, processor: MedicalImageProcessor, count: int) -> np.ndarray:
    """The repo's golden input (when it has the processor's shape) and phantoms of its modality, prepared."""
    prepared = [
        processor.prepare(array).pixel_values
        for array in phantom_arrays(processor.modality, processor.spatial_dims, count)
    ]
    golden = repo_dir / "golden.safetensors"
    if golden.is_file():
        pixels = load_file(str(golden)).get(GOLDEN_INPUT)
        if pixels is not None and pixels.shape[1:] == prepared[0].shape:
            prepared = [pixels[0].astype(np.float32)] + prepared[: count - 1]
    return np.stack(prepared).astype(np.float32)


def calibration_inputs(
    repo_dir: Path, processor: MedicalImageProcessor, source: Path | None, count: int
) -> tuple[np.ndarray, str]:
    """Up to `count` prepared inputs and a description of where they came from (recorded in the metadata)."""
    if count < 1:
        raise InputError(f"the calibration size must be at least 1, not {count}")
    if source is None:
        return reference_inputs(repo_dir, processor, count), f"golden+phantoms:{processor.modality}"
    if source.is_file():
        rows = [row for row in load_manifest(source) if row.modality == processor.modality]
        paths = [row.resolve(source.parent)[0] for row in rows]
    elif source.is_dir():
        paths = sorted(path for path in source.rglob("*") if path.is_file() and "_mask" not in path.stem)
    else:
        raise InputError(f"calibration source {source} is neither a manifest file nor a folder")
    prepared = []
    for path in paths:
        if len(prepared) == count:
            break
        try:
            prepared.append(processor.prepare(path).pixel_values)
        except MedhubError:  # a file of another kind or dimensionality in the folder
            continue
    if not prepared:
        raise InputError(
            f"calibration source {source} holds no {processor.spatial_dims}D {processor.modality} "
            "image the model's processor can read"
        )
    return np.stack(prepared).astype(np.float32), str(source)


def _outputs(path: Path, inputs: np.ndarray) -> list[np.ndarray]:
    session = create_session(path, threads=None, device="cpu")
    runs = [session.run(None, {GOLDEN_INPUT: inputs[start : start + 4]}) for start in range(0, len(inputs), 4)]
    return [np.concatenate(parts) for parts in zip(*runs)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)


def _masks(logits: np.ndarray) -> np.ndarray:
    return (logits[:, 0] > 0).astype(np.uint8) if logits.shape[1] == 1 else logits.argmax(axis=1).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two label maps over their foreground (labels > 0 must match); 1 when both are empty."""
    total = int((a > 0).sum() + (b > 0).sum())
    return 1.0 if total == 0 else 2.0 * float(((a == b) & (a > 0)).sum()) / total


def gate_figure(task: str, reference: np.ndarray, candidate: np.ndarray) -> tuple[str, float]:
    """The gated metric of `candidate` (int8 first output) against `reference` (float32 first output)."""
    if task == "classification":
        return "agreement", float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean())
    if task == "segmentation":
        return "dice", dice(_masks(reference), _masks(candidate))
    return "cosine", float(_cosines(reference, candidate).min())


def _threshold(metric: str, gate: Gate) -> float:
    return {"cosine": gate.min_cosine, "agreement": gate.min_agreement, "dice": gate.min_dice}[metric]


def export_int8(
    repo_dir: Path,
    task: str,
    out_path: Path,
    *,
    repo_id: str,
    revision: str,
    processor: MedicalImageProcessor,
    fp32_path: Path | None = None,
    calibration: Path | None = None,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    gate: Gate = Gate(),
    methods: tuple[str, ...] = tuple(METHODS),
    progress: bool = False,
) -> Int8Export:
    """Quantize `task` of the repo to `out_path` with each of `methods`, keep the closest to float32, and refuse
    it (`QuantizationGateError`, nothing written) when it falls below `gate`.

    `fp32_path` is an existing float32 export of the same task (the service's cache); without it one is made."""
    inputs, source = calibration_inputs(repo_dir, processor, calibration, calibration_size)
    checked = (
        inputs
        if calibration is None
        else np.concatenate([inputs, reference_inputs(repo_dir, processor, DEFAULT_CALIBRATION_SIZE)])
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if fp32_path is None:
            fp32_path = export_onnx(repo_dir, task, work / "fp32.onnx", repo_id=repo_id, revision=revision).path
        prepared = work / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference does not follow every exported graph; ONNX's own does
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        expected = _outputs(fp32_path, checked)[0]
        results: dict[tuple[str, str], tuple[str, float, float]] = {}
        graph = onnx.load(str(prepared)).graph
        for plan, excluded in (("all", []), ("fp32-edges", sensitive_nodes(graph))):
            for method in tqdm(methods, desc=f"int8 {task} ({plan})", unit="method", disable=not progress):
                candidate = work / f"{plan}-{method}.onnx"
                with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
                    quantize_static(
                        str(prepared),
                        str(candidate),
                        _Reader(inputs),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        reduce_range=True,  # weights of WEIGHT_BITS bits
                        calibrate_method=METHODS[method],
                        op_types_to_quantize=COMPUTE_OPS if task == "segmentation" else QUANTIZED_OPS,
                        nodes_to_exclude=excluded,
                        extra_options={"CalibTensorRangeSymmetric": False},
                    )
                actual = _outputs(candidate, checked)[0]
                metric, value = gate_figure(task, expected, actual)
                results[plan, method] = (metric, value, float(_cosines(expected, actual).mean()))
                logger.info("int8 %s of %s, %s, %s calibration: %s %.5f", task, repo_id, plan, method, metric, value)
            if max(figures[1] for figures in results.values()) >= _threshold(metric, gate):
                break  # quantizing every node passes: keep its speed
        best = max(results, key=lambda key: results[key][1:])
        metric, value, cosine = results[best]
        plan, method = best
        if not value >= _threshold(metric, gate):
            raise QuantizationGateError(
                f"the int8 {task} graph of {repo_id} reaches {metric} {value:.4f} to float32 on {len(checked)} inputs "
                f"(best of {', '.join(methods)} calibration, with and without fp32 edges and attention: {method}; "
                f"at least {_threshold(metric, gate):g} is required), so it was not written; calibrate on images "
                f"like the ones served ({source}) or serve float32"
            )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / f"{plan}-{method}.onnx", out_path)
    write_metadata(
        out_path,
        repo_id=repo_id,
        revision=revision,
        task=task,
        config=read_config(repo_dir),
        repo_dir=repo_dir,
        precision="int8",
        extra={
            "calibration": source,
            "calibration_size": str(len(inputs)),
            "calibration_method": method,
            "fp32_nodes": plan,
            "weight_bits": str(WEIGHT_BITS),
            f"gate_{metric}": f"{value:.6f}",
        },
    )
    return Int8Export(
        out_path,
        task,
        method,
        plan,
        source,
        len(inputs),
        metric,
        value,
        cosine,
        {f"{key[0]}/{key[1]}": figures[1] for key, figures in results.items()},
    )


def saturation_free(path: Path) -> bool:
    """Whether an int8 graph records weights of WEIGHT_BITS bits; graphs cached before medhub recorded it have 8-bit
    weights, which saturate on CPUs without VNNI, and are rebuilt."""
    metadata = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    return metadata.get("weight_bits") == str(WEIGHT_BITS)


def sensitive_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes to keep in float32 when quantizing everything fails the gate: the first and last compute nodes (the
    stem conv, which sees raw intensities, and the head) and activation-by-activation MatMuls (attention scores
    and their weighted sum, whose inputs have no fixed range)."""
    constants = {tensor.name for tensor in graph.initializer}
    constants |= {output for node in graph.node if node.op_type == "Constant" for output in node.output}
    compute = [node for node in graph.node if node.op_type in COMPUTE_OPS]
    attention = [node for node in compute if node.op_type == "MatMul" and not constants.intersection(node.input)]
    return list(dict.fromkeys(node.name for node in [*compute[:1], *compute[-1:], *attention]))
