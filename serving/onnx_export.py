"""ONNX export of a repo's task graph, with metadata and an enforced parity check against torch."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxscript.optimizer
import torch
import transformers
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxscript import ir
from torch import nn

from hub import __version__
from hub.embed import pool_hidden_state
from hub.errors import MedhubError, RepoError
from hub.export.resolve import read_config
from hub.models import get_family

from .runtime import create_session

TASKS = {
    "features": "AutoModel",
    "classification": "AutoModelForImageClassification",
    "segmentation": "AutoModelForSemanticSegmentation",
}
HEAD_SUFFIXES = {"classification": "ForImageClassification", "segmentation": "ForSemanticSegmentation"}
PARITY_ATOL = 1e-4
# float16 keeps ~3 significant digits: its graphs must match torch (float32) to 1e-2 of the largest output magnitude
# (at least 1e-2 absolute), i.e. max abs diff <= FP16_PARITY_RTOL * max(1, max |torch output|) over all outputs.
FP16_PARITY_RTOL = 1e-2
FOLD_SIZE_LIMIT = 1 << 20  # elements; constant subgraphs up to this size are folded in float32 before conversion


class ExportError(MedhubError):
    """An ONNX export that failed or does not reproduce the torch model."""


@dataclass
class OnnxExport:
    path: Path
    task: str
    output_names: list[str]
    max_abs_diff: float
    parity_limit: float
    precision: str


class TaskGraph(nn.Module):
    """`pixel_values` -> the outputs a route needs: features (pooled embedding, then each hidden state pooled
    over its spatial or token axes), classification or segmentation logits."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.task != "features":
            return (self.model(pixel_values=pixel_values).logits,)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        layers = tuple(pool_hidden_state(hidden) for hidden in outputs.hidden_states or ())
        return (outputs.pooler_output, *layers)


def available_tasks(repo_dir: Path) -> list[str]:
    """`features` always; a head task when the repo's architecture is that head."""
    architectures = read_config(repo_dir).get("architectures") or []
    tasks = ["features"]
    for task, suffix in HEAD_SUFFIXES.items():
        if any(name.endswith(suffix) for name in architectures):
            tasks.append(task)
    return tasks


def export_onnx(
    repo_dir: Path, task: str, out_path: Path, *, repo_id: str, revision: str, fp16: bool = False
) -> OnnxExport:
    """Export `task` of the repo at `repo_dir` to `out_path` (dynamic batch) and check it against torch.

    With `fp16` the weights and compute are float16 while inputs and outputs stay float32, so callers need no
    change; the parity limit is then relative to the output scale (`parity_limit`)."""
    if task not in available_tasks(repo_dir):
        raise RepoError(f"repo {repo_id} has no {task} head; it offers {', '.join(available_tasks(repo_dir))}")
    config = read_config(repo_dir)
    family = get_family(config["model_type"])
    if task == "features":
        model = family.load_encoder(repo_dir).eval()
    else:
        model = getattr(transformers, TASKS[task]).from_pretrained(repo_dir).eval()
    graph = TaskGraph(model, task).eval()
    example = family.example_inputs(model.config, 2, 0)["pixel_values"]
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in graph(example)]
    output_names = _output_names(task, len(expected))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=output_names,
            dynamic_shapes={"pixel_values": {0: "batch"}},
            external_data=False,
            verbose=False,
        )
    except Exception as error:  # torch.export raises many types; the user needs one line either way
        raise ExportError(
            f"ONNX export of {repo_id} ({task}) failed: {error.__class__.__name__}: {str(error).splitlines()[0]}"
        ) from None
    if fp16:
        onnx.save(to_float16(program.model_proto), str(out_path))
    else:
        program.save(str(out_path))
    precision = "fp16" if fp16 else "fp32"
    write_metadata(
        out_path, repo_id=repo_id, revision=revision, task=task, config=config, repo_dir=repo_dir, precision=precision
    )
    # parity is a property of the file, checked on the CPU provider (CUDA's TF32 matmuls would blur the 1e-4 limit)
    actual = create_session(out_path, threads=1, device="cpu").run(None, {"pixel_values": example.numpy()})
    difference = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))
    limit = parity_limit(expected, fp16)
    if not difference <= limit:
        out_path.unlink()
        raise ExportError(
            f"ONNX {task} graph ({precision}) of {repo_id} differs from torch by {difference:.3g} (limit {limit:.3g})"
        )
    return OnnxExport(out_path, task, output_names, difference, limit, precision)


def parity_limit(expected: list[np.ndarray], fp16: bool) -> float:
    """The largest max abs difference from torch that an export may show (see `FP16_PARITY_RTOL`)."""
    if not fp16:
        return PARITY_ATOL
    return FP16_PARITY_RTOL * max(1.0, *(float(np.abs(output).max()) for output in expected))


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 graph whose inputs and outputs stay float32 (casts at the edges).

    Constant subgraphs (Swin V2's relative-position MLP and shifted-window masks) are folded in float32 first:
    each table is rounded once, and ONNX Runtime could not fold them later (its CPU provider lacks float16
    kernels for most ops; for those it runs the op in float32 between inserted casts, and warns at load).
    ONNX Runtime's default block list keeps the ops without float16 support in float32; its normalisation,
    softmax and reduction kernels accumulate in float32.
    """
    folded = ir.from_proto(model)
    onnxscript.optimizer.fold_constants(
        folded,
        input_size_limit=FOLD_SIZE_LIMIT,
        output_size_limit=FOLD_SIZE_LIMIT,
        should_fold=lambda node: True if node.op_type == "ConstantOfShape" else None,  # masks start from one
    )
    proto = ir.to_proto(folded)
    # The exporter declares initializers in value_info; the converter would then cast an initializer that only
    # float32 inputs use (Resize scales) once per consumer under one name, which is an invalid graph.
    initializers = {tensor.name for tensor in proto.graph.initializer}
    declared = [info for info in proto.graph.value_info if info.name not in initializers]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(declared)
    converted = ir.from_proto(convert_float_to_float16(proto, keep_io_types=True))
    converted.graph.sort()  # the converter appends its casts at the end; other runtimes need topological order
    return ir.to_proto(converted)


def _output_names(task: str, count: int) -> list[str]:
    if task != "features":
        return ["logits"]
    return ["pooler_output"] + [f"layer_{index}" for index in range(count - 1)]


def write_metadata(
    path: Path,
    *,
    repo_id: str,
    revision: str,
    task: str,
    config: dict,
    repo_dir: Path,
    precision: str,
    extra: dict[str, str] | None = None,
) -> None:
    """Replace the graph's metadata: repo, revision, task, precision, labels, input spec (and `extra` entries)."""
    model = onnx.load(str(path))
    preprocessor = repo_dir / "preprocessor_config.json"
    entries = {
        "medhub_version": __version__,
        "repo_id": repo_id,
        "revision": revision,
        "task": task,
        "precision": precision,
        "model_type": config["model_type"],
        "labels": json.dumps(config.get("id2label") or {}),
        "input_spec": preprocessor.read_text() if preprocessor.is_file() else "{}",
        **(extra or {}),
    }
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
