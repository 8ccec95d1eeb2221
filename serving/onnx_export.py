"""ONNX export of a repo's task graph, with metadata and an enforced parity check against torch."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import transformers
from torch import nn

from hub import __version__
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


class ExportError(MedhubError):
    """An ONNX export that failed or does not reproduce the torch model."""


@dataclass
class OnnxExport:
    path: Path
    task: str
    output_names: list[str]
    max_abs_diff: float


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
        layers = tuple(_pool_hidden_state(hidden) for hidden in outputs.hidden_states or ())
        return (outputs.pooler_output, *layers)


def _pool_hidden_state(hidden: torch.Tensor) -> torch.Tensor:
    """Mean over tokens for (B, N, C) sequences, over space for (B, C, *spatial) maps."""
    return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)


def available_tasks(repo_dir: Path) -> list[str]:
    """`features` always; a head task when the repo's architecture is that head."""
    architectures = read_config(repo_dir).get("architectures") or []
    tasks = ["features"]
    for task, suffix in HEAD_SUFFIXES.items():
        if any(name.endswith(suffix) for name in architectures):
            tasks.append(task)
    return tasks


def export_onnx(repo_dir: Path, task: str, out_path: Path, *, repo_id: str, revision: str) -> OnnxExport:
    """Export `task` of the repo at `repo_dir` to `out_path` (dynamic batch) and check it against torch."""
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
            graph, (example,), dynamo=True, input_names=["pixel_values"], output_names=output_names,
            dynamic_shapes={"pixel_values": {0: "batch"}}, external_data=False, verbose=False,
        )
    except Exception as error:  # torch.export raises many types; the user needs one line either way
        raise ExportError(f"ONNX export of {repo_id} ({task}) failed: {error.__class__.__name__}: {str(error).splitlines()[0]}") from None
    program.save(str(out_path))
    _write_metadata(out_path, repo_id=repo_id, revision=revision, task=task, config=config, repo_dir=repo_dir)
    actual = create_session(out_path, threads=1).run(None, {"pixel_values": example.numpy()})
    difference = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))
    if not difference <= PARITY_ATOL:
        out_path.unlink()
        raise ExportError(f"ONNX {task} graph of {repo_id} differs from torch by {difference:.3g} (limit {PARITY_ATOL})")
    return OnnxExport(out_path, task, output_names, difference)


def _output_names(task: str, count: int) -> list[str]:
    if task != "features":
        return ["logits"]
    return ["pooler_output"] + [f"layer_{index}" for index in range(count - 1)]


def _write_metadata(path: Path, *, repo_id: str, revision: str, task: str, config: dict, repo_dir: Path) -> None:
    model = onnx.load(str(path))
    preprocessor = repo_dir / "preprocessor_config.json"
    entries = {
        "medhub_version": __version__,
        "repo_id": repo_id,
        "revision": revision,
        "task": task,
        "model_type": config["model_type"],
        "labels": json.dumps(config.get("id2label") or {}),
        "input_spec": preprocessor.read_text() if preprocessor.is_file() else "{}",
    }
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
