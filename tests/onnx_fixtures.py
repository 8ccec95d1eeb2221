"""Every tiny preset's tasks as repos with a head, and their float32 ONNX graphs made once per session."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hub.catalogue import VARIANTS
from hub.export import Provenance, export_variant
from hub.models import get_family
from serving.models import repo_revision
from serving.onnx_export import OnnxExport, export_onnx

HEADS = {
    "features": "AutoModel",
    "classification": "AutoModelForImageClassification",
    "segmentation": "AutoModelForSemanticSegmentation",
}
CASES = [
    (variant.id, task)
    for variant in VARIANTS.values()
    if variant.tiny
    for task, auto_name in HEADS.items()
    if auto_name in get_family(variant.family).auto_classes
]


def head_repo(tmp_path: Path, variant_id: str, task: str) -> tuple[torch.nn.Module, Path]:
    variant = VARIANTS[variant_id]
    config = variant.build_config(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    model = get_family(variant.family).auto_classes[HEADS[task]](config).eval()
    return model, export_variant(model, tmp_path / "repo", variant, Provenance("trained", "test"))


def fp32_graph(
    built_once: Callable[[str, Callable[[Path], Any]], Any], variant_id: str, task: str
) -> tuple[Path, OnnxExport]:
    """The seeded tiny `variant_id` repo with the head of `task`, and its float32 graph exported once per session
    (`built_once`, the conftest fixture) as the service would cache it: `<folder>/onnx/<revision>/<task>.onnx`,
    with the repo's path as `repo_id`."""

    def build(folder: Path) -> tuple[Path, OnnxExport]:
        torch.manual_seed(0)
        repo = head_repo(folder, variant_id, task)[1]
        revision = repo_revision(repo)
        graph = folder / "onnx" / revision / f"{task}.onnx"
        return repo, export_onnx(repo, task, graph, repo_id=str(repo), revision=revision)

    return built_once(f"graph-{variant_id}-{task}", build)
