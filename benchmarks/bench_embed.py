"""`medhub embed` throughput on phantom radiographs (half 224 px PNG, half 1024 px DICOM) and muscle-resnet50.

Prints images/s side by side, in one run: (a) `medhub embed` (its defaults: ONNX Runtime on every core, decoding
in cores // 4 processes, below 4 cores in a thread of the command's process), (b) the loop a user writes with
transformers (AutoImageProcessor + AutoModel, torch eager, batch 16), (c) raw ONNX Runtime on pre-decoded
tensors (the ceiling: no decoding at all), (d) `medhub embed --engine ray` on a local Ray instance.
(a) and (d) are whole command runs (worker and actor start-up included).
Goals (issue #18): (a) >= 1.5 x (b), (a) >= 0.8 x (c), (d) >= 0.7 x (a). Random weights: speed does not depend
on them. `--count` runs it smaller.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import hub  # noqa: F401
from hub.catalogue import get_variant
from hub.data.phantoms import chest_xray, write_dicom_image
from hub.embed import list_sources, model_inputs
from hub.export import Provenance, export_variant
from hub.export.resolve import repo_revision
from hub.models import get_family
from serving.cli import register
from serving.models import task_graph
from serving.runtime import create_session

BATCH = 16


def build_repo(root: Path) -> Path:
    variant = get_variant("muscle-resnet50")
    torch.manual_seed(0)
    model = get_family(variant.family).encoder_class(variant.build_config())
    return export_variant(model, root / "muscle-resnet50", variant, Provenance("random-init", "benchmark"))


def phantoms(folder: Path, count: int) -> Path:
    """`count` radiographs: even ones 224 px 16-bit PNG, odd ones 1024 px DICOM (a few phantoms, reused)."""
    rng = np.random.default_rng(0)
    small = [chest_xray(rng, 224, nodule=bool(i % 2))["image"] for i in range(4)]
    large = [chest_xray(rng, 1024, nodule=bool(i % 2))["image"] for i in range(2)]
    (folder / "png").mkdir(parents=True)
    (folder / "dicom").mkdir()
    for i in range(count):
        if i % 2 == 0:
            Image.fromarray(small[i // 2 % 4]).save(folder / "png" / f"{i:05d}.png")
        else:
            write_dicom_image(large[i // 2 % 2], folder / "dicom" / f"{i:05d}.dcm", f"bench-{i}")
    return folder


def medhub_embed(repo: Path, data: Path, out: Path, *extra: str) -> float:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["embed", str(repo), "--data", str(data), "--out", str(out), "--no-progress", *extra])
    count = len(list_sources(data))
    start = time.perf_counter()
    args.handler(args)
    return count / (time.perf_counter() - start)


def transformers_loop(repo: Path, data: Path) -> float:
    processor = AutoImageProcessor.from_pretrained(repo)
    model = AutoModel.from_pretrained(repo).eval()
    paths = [str(s.path) for s in list_sources(data)]
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), BATCH):
            model(**processor(paths[i : i + BATCH])).pooler_output.numpy()
    return len(paths) / (time.perf_counter() - start)


def raw_onnx(repo: Path, data: Path, cache: Path) -> float:
    processor = AutoImageProcessor.from_pretrained(repo)
    session = create_session(task_graph(repo, str(repo), repo_revision(repo), "features", cache))
    tensors = np.concatenate([model_inputs(processor, s.path) for s in list_sources(data)])
    session.run(None, {"pixel_values": tensors[:BATCH]})  # warm-up
    start = time.perf_counter()
    for i in range(0, len(tensors), BATCH):
        session.run(None, {"pixel_values": tensors[i : i + BATCH]})
    return len(tensors) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="images (default 2000)")
    count = parser.parse_args().count
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        os.environ["MEDHUB_ONNX_CACHE"] = str(root / "onnx")
        repo, data = build_repo(root), phantoms(root / "data", count)
        c = raw_onnx(repo, data, root / "onnx")  # also exports the graph, so (a) and (d) find it cached
        a = medhub_embed(repo, data, root / "out-local")
        d = medhub_embed(repo, data, root / "out-ray", "--engine", "ray")
        b = transformers_loop(repo, data)
        print(
            f"medhub embed on {count} phantom radiographs (224 px PNG + 1024 px DICOM), muscle-resnet50, "
            f"{os.cpu_count()} cores"
        )
        print(f"{'(a) medhub embed':<44}{a:8.1f} img/s")
        print(f"{'(b) transformers loop (eager, batch 16)':<44}{b:8.1f} img/s   (a)/(b) = {a / b:.2f}  (goal >= 1.5)")
        print(f"{'(c) raw ONNX Runtime, pre-decoded tensors':<44}{c:8.1f} img/s   (a)/(c) = {a / c:.2f}  (goal >= 0.8)")
        print(f"{'(d) medhub embed --engine ray':<44}{d:8.1f} img/s   (d)/(a) = {d / a:.2f}  (goal >= 0.7)")
        print(f"benchmark took {time.perf_counter() - began:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
