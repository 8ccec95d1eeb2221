"""Decode + preprocess cost per input, beside one ResNet-50 ONNX Runtime CPU forward on the same machine.

Goal (issue 3): a 2D radiograph costs at most 25% of the ResNet-50 forward. The table also prints the time to
inflate the radiograph PNG's compressed stream alone (zlib, no unfiltering, no preprocessing): no PNG decoder can
be faster than that on this machine. Last, the cost of refusing a small upload that declares a volume whose
sliding-window tiles are over the array budget: from its header (what the readers do) beside decoding it first.
Run: python benchmarks/bench_io.py
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import SimpleITK as sitk
import torch
import torchvision
from PIL import Image

from hub.catalogue import get_variant
from hub.data.phantoms import chest_xray, ct_volume, write_nifti
from hub.errors import LimitExceededError
from hub.io import ReadLimits, read_image
from hub.processing import MedicalImageProcessor, preset


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _package_file(package: str, *parts: str) -> Path:
    return Path(importlib.util.find_spec(package).origin).parent.joinpath(*parts)


def _png_inflate_floor_ms(path: Path, repeats: int) -> float:
    """Inflating the PNG's IDAT stream alone: a lower bound on any PNG decoder's time for this file."""
    data, position, idat = path.read_bytes(), 8, []
    while position < len(data):
        length, kind = int.from_bytes(data[position : position + 4], "big"), data[position + 4 : position + 8]
        if kind == b"IDAT":
            idat.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    stream = b"".join(idat)
    return _median_ms(lambda: zlib.decompress(stream), repeats)


def _resnet50_session(folder: Path) -> ort.InferenceSession:
    model = torchvision.models.resnet50().eval()
    example = (torch.randn(2, 3, 224, 224),)
    path = folder / "resnet50.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, example, str(path), dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}}
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="medhub-bench-") as tmp:
        folder = Path(tmp)
        radiograph = folder / "radiograph_2048.png"
        pixels = chest_xray(np.random.default_rng(0), size=2048, nodule=True)["image"] * 16  # 12 -> 16 bit range
        Image.fromarray(pixels.astype(np.uint16)).save(radiograph)
        ct = write_nifti(
            ct_volume(np.random.default_rng(0), shape=(200, 512, 512))["image"], folder / "ct.nii.gz", (0.8, 0.8, 2.5)
        )
        xray = MedicalImageProcessor(**preset("muscle"))
        cases = [
            ("2048x2048 16-bit radiograph PNG", xray, radiograph, 20),
            ("RG1_UNCI.dcm (1955x1841, MONOCHROME1)", xray, _package_file("data_store", "data", "RG1_UNCI.dcm"), 10),
            (
                "MNI152 T1 NIfTI (197x233x189)",
                MedicalImageProcessor(**preset("medcoss-mri")),
                _package_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
                5,
            ),
            ("512x512x200 CT phantom NIfTI -> 1 mm", MedicalImageProcessor(**preset("medcoss-ct")), ct, 2),
        ]
        session = _resnet50_session(folder)
        batch = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        name = session.get_inputs()[0].name
        forward = _median_ms(lambda: session.run(None, {name: batch}), 20)
        print(
            f"machine: torch threads {torch.get_num_threads()}, ORT provider {session.get_providers()[0]}, "
            f"SimpleITK threads {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}"
        )
        print(
            f"{'input':42s} {'decode ms':>10s} {'preprocess ms':>14s} "
            f"{'decode+preprocess ms':>21s} {'/ ResNet-50':>12s}"
        )
        results = {}
        for label, processor, path, repeats in cases:
            decode = _median_ms(partial(read_image, str(path)), repeats)
            image = read_image(str(path))
            prep = _median_ms(partial(processor, image), repeats)
            ms = _median_ms(partial(processor, str(path)), repeats)
            results[label] = ms
            print(f"{label:42s} {decode:10.1f} {prep:14.1f} {ms:21.1f} {ms / forward:12.0%}")
        print(f"{'ResNet-50 ONNX Runtime CPU forward, 1x3x224x224':42s} {forward:21.1f}")
        floor = _png_inflate_floor_ms(radiograph, 20)
        print(
            f"{'radiograph PNG: zlib inflate of its IDAT alone':42s} {floor:10.1f} {'':14s} {'':21s} "
            f"{floor / forward:12.0%}"
        )
        ratio = results[cases[0][0]] / forward
        print(f"radiograph / ResNet-50 = {ratio:.0%} (goal <= 25%: {'met' if ratio <= 0.25 else 'not met'})")
        _refusals(folder)


def _refusals(folder: Path) -> None:
    """A 512 x 512 x 400 int16 volume of zeros (105 M voxels, inside the default voxel budget) as .nii.gz, sent to
    the 3D segmenter's processor: 23,064 tiles of 32^3 float32 values (2.9 GiB), over the 512 MiB array budget."""
    data = write_nifti(np.zeros((400, 512, 512), np.int16), folder / "bomb.nii.gz", (1.0, 1.0, 1.0)).read_bytes()
    processor, limits = get_variant("macl-unet3d-tiny").build_processor(), ReadLimits()

    def refused(source_of: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                processor.tile(source_of(), limits)
            except LimitExceededError:
                return
            raise AssertionError("the volume was not refused")

        return run

    header = _median_ms(refused(lambda: data), 5)
    decoded = _median_ms(refused(lambda: read_image(data, limits)), 3)  # the reader without the processor's check
    print(
        f"refusing a {len(data) // 1024} KB .nii.gz declaring 512x512x400 int16 (tiles over the array budget): "
        f"from its header {header:.1f} ms, decoding it first {decoded:.0f} ms ({decoded / header:.0f}x)"
    )


if __name__ == "__main__":
    main()
