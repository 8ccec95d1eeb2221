"""A served model: a repo's processor plus one ONNX Runtime session per task, exported once per revision."""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from filelock import FileLock

from hub.embed import model_inputs, pool_tiles
from hub.errors import InputError, MedhubError, RepoError
from hub.export.resolve import read_config, repo_revision, resolve_repo
from hub.io import ImageSource, ReadLimits, read_image
from hub.io.declared import DeclaredVolume
from hub.io.dicom_seg import Algorithm, build_segmentation, dicom_bytes
from hub.io.dicom_sr import build_classification_sr
from hub.io.image import MedicalImage
from hub.processing import MedicalImageProcessor

from .batching import MicroBatcher
from .onnx_export import available_tasks, export_onnx
from .quantize import export_int8, saturation_free
from .runtime import CUDA, active_provider, create_session, default_threads

logger = logging.getLogger("medhub.serving")

TILE_BATCH = 2
"""Tiles per session run for a 3D volume's sliding window (as `MedicalImageProcessor.predict`): one run over
all of them held every tile's activations at once (1,848 tiles of the 1 mm MNI template took gigabytes)."""


class UnknownModelError(RepoError):
    """A request naming a model the service did not load."""


class TaskNotAvailableError(InputError):
    """A request for a task the model has no head for."""


class DimensionalityError(InputError):
    """A 2D image sent to a 3D model, or the reverse."""


class DeadlinePassedError(MedhubError):
    """Work stopped because the request's time ran out (its client already got BentoML's 504)."""


@dataclass
class ServedModel:
    id: str
    repo_dir: Path
    revision: str
    config: dict[str, Any]
    processor: MedicalImageProcessor
    sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return active_provider(next(iter(self.sessions.values())))

    def describe(self) -> dict[str, Any]:
        spec = self.processor.to_dict()
        return {
            "id": self.id,
            "family": self.config["model_type"],
            "tasks": sorted(self.sessions),
            "modality": spec["modality"],
            "input": {key: spec[key] for key in ("spatial_dims", "in_channels", "size", "intensity")},
            "labels": self.labels,
            "revision": self.revision,
            "provider": self.provider,
        }

    @property
    def labels(self) -> list[str]:
        id2label = self.config.get("id2label") or {}
        return [id2label[key] for key in sorted(id2label, key=int)]

    def _run(self, task: str, pixel_values: np.ndarray) -> list[np.ndarray]:
        """All outputs of `task` for a batch; 2D single images go through the task's micro-batcher."""
        if task not in self.sessions:
            raise TaskNotAvailableError(
                f"model {self.id} has no {task} head; it serves {', '.join(sorted(self.sessions))}"
            )
        if task in self.batchers and len(pixel_values) == 1:
            return [output[None] for output in self.batchers[task].submit(pixel_values[0])]
        run = pixels_runner(self.sessions[task])
        if len(pixel_values) <= TILE_BATCH:
            return run(pixel_values)
        chunks = [run(pixel_values[i : i + TILE_BATCH]) for i in range(0, len(pixel_values), TILE_BATCH)]
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def _image(self, data: ImageSource, limits: ReadLimits, dense: bool = False) -> MedicalImage:
        """The upload, refused from its header where that can tell (a volume for a 2D model, or one whose
        float32 copy or, for a ``dense`` route over the whole volume, sliding-window tiles would exceed
        ``limits``) before it is decoded."""

        def inspect(declared: DeclaredVolume) -> None:
            self._check_dims(3)
            self.processor.check_declared(declared, limits, dense and self.processor.tiles_volumes)

        image = read_image(data, limits, inspect)
        self._check_dims(image.spatial_dims)
        return image

    def _check_dims(self, spatial_dims: int) -> None:
        wanted = self.processor.spatial_dims
        if spatial_dims != wanted:
            raise DimensionalityError(
                f"the upload is a {spatial_dims}D image but model {self.id} takes {wanted}D input"
            )

    def embed(self, data: ImageSource, limits: ReadLimits, layers: list[int] | None = None) -> dict[str, Any]:
        """The pooled embedding and any wanted hidden states, as float32 arrays (the service writes them as JSON);
        a 3D volume's sliding-window tiles are pooled by their mean, as in `medhub embed`."""
        outputs = [
            pool_tiles(output)
            for output in self._run(
                "features",
                model_inputs(self.processor, self._image(data, limits, dense=True), limits),
            )
        ]
        result: dict[str, Any] = {"embedding": outputs[0], "dim": int(outputs[0].shape[0])}
        if layers:
            hidden = outputs[1:]
            for layer in layers:
                if not -len(hidden) <= layer < len(hidden):
                    raise InputError(f"layer {layer} does not exist; model {self.id} has layers 0..{len(hidden) - 1}")
            result["layers"] = {str(layer): hidden[layer] for layer in layers}
        return result

    def classify(self, data: ImageSource, limits: ReadLimits) -> list[dict[str, Any]]:
        return self._classify_image(self._image(data, limits), limits)

    def _classify_image(self, image: MedicalImage, limits: ReadLimits) -> list[dict[str, Any]]:
        pixel_values = self.processor.prepare(image, limits).pixel_values[None]
        logits = self._run("classification", pixel_values)[0][0].astype(np.float64)
        if self.config.get("problem_type") == "multi_label_classification":
            probabilities = 1.0 / (1.0 + np.exp(-logits))
        else:
            shifted = np.exp(logits - logits.max())
            probabilities = shifted / shifted.sum()
        ranked = sorted(zip(self.labels, probabilities.tolist()), key=lambda pair: -pair[1])
        return [{"label": label, "probability": probability} for label, probability in ranked]

    def _dense(self, deadline: float | None) -> Callable[[np.ndarray], np.ndarray]:
        """The segmentation head for `predict`'s tile loop, stopping it (DeadlinePassedError) once `deadline`
        (time.monotonic()) has passed, so a timed-out 3D request frees its core instead of finishing unseen."""

        def run(batch: np.ndarray) -> np.ndarray:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlinePassedError(f"the request ran past its time limit; model {self.id} stopped")
            return self._run("segmentation", batch)[0]

        return run

    def segment(
        self, data: ImageSource, limits: ReadLimits, deadline: float | None = None
    ) -> tuple[np.ndarray, MedicalImage]:
        """Labels on the input's grid: argmax over classes (foreground > 0 for a single-channel head)."""
        image = self._image(data, limits, dense=True)
        logits, image = self.processor.predict(image, self._dense(deadline), limits=limits)
        return label_mask(logits), image

    @property
    def algorithm(self) -> Algorithm:
        return Algorithm(self.id, self.revision)

    def segmentation_dicom(self, data: ImageSource, limits: ReadLimits, deadline: float | None = None) -> bytes:
        """A DICOM SEG of the input's mask (binary; fractional probabilities where the repo's config says
        `"dicom_seg_type": "fractional"`, with coded concepts from its `label_codes`)."""
        image = self._image(data, limits, dense=True)
        logits, image = self.processor.predict(image, self._dense(deadline), limits=limits)
        if logits.shape[0] == 1:
            foreground = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
            probabilities = np.concatenate([1.0 - foreground, foreground])
        else:
            shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
            probabilities = shifted / shifted.sum(axis=0, keepdims=True)
        mask = label_mask(logits)
        fractional = self.config.get("dicom_seg_type") == "fractional"
        seg = build_segmentation(
            mask,
            image,
            self.labels or ["background", "foreground"],
            self.algorithm,
            probabilities if fractional else None,
            self.config.get("label_codes"),
        )
        return dicom_bytes(seg)

    def classification_sr(self, data: ImageSource, limits: ReadLimits) -> bytes:
        """A DICOM Comprehensive SR of the labels and probabilities `classify` returns."""
        image = self._image(data, limits)
        return dicom_bytes(build_classification_sr(self._classify_image(image, limits), image, self.algorithm))

    def mask_summary(self, mask: np.ndarray, image: MedicalImage) -> dict[str, Any]:
        """Per-label counts with area (mm², 2D) or volume (mL, 3D); ``shape`` and ``spacing`` in ``axes`` order."""
        spacing = list(image.spacing)[::-1]  # SimpleITK's x, y(, z) -> numpy's (z,) y, x like the mask
        element = math.prod(spacing)
        size_key, scale = ("area_mm2", element) if mask.ndim == 2 else ("volume_ml", element / 1000.0)
        labels = self.labels or ["background", "foreground"]
        counts = np.bincount(mask.ravel(), minlength=len(labels))
        return {
            "model": self.id,
            "axes": "yx" if mask.ndim == 2 else "zyx",
            "shape": list(mask.shape),
            "spacing": spacing,
            "labels": [
                {
                    "label": labels[index] if index < len(labels) else str(index),
                    "voxels": int(count),
                    size_key: float(count) * scale,
                }
                for index, count in enumerate(counts)
            ],
        }


def label_mask(logits: np.ndarray) -> np.ndarray:
    """Labels from (K, *spatial) logits: argmax over classes, foreground > 0 for a single-channel head."""
    return (logits[0] > 0).astype(np.uint8) if logits.shape[0] == 1 else logits.argmax(axis=0).astype(np.uint8)


def pixels_runner(session: ort.InferenceSession) -> Callable[[np.ndarray], list[np.ndarray]]:
    """All outputs of the session for a batch of `pixel_values`."""
    return lambda pixel_values: session.run(None, {"pixel_values": pixel_values})


def load_served_model(
    model_id: str,
    onnx_cache: Path,
    device: str = "auto",
    threads: int | None = None,
    fp16: bool = False,
    runners: int | None = None,
    max_batch: int | None = None,
    int8: bool = False,
    workers: int = 1,
) -> ServedModel:
    """Resolve the repo, load its processor, and open (exporting on first use) a session per task.

    2D tasks are micro-batched, with `runners` batches of up to `max_batch` images in flight at once on `threads`
    intra-op threads each. On CPU the default is one single-threaded run per core plus one, of at most 2 images:
    while a run waits for its batch to fill (or its results go back), the others keep every core busy, where
    one run spread over all cores stalls on whichever core is decoding an upload; and on one thread a larger
    batch saves little but spills the shared cache (`benchmarks/bench_serving.py` measures the throughput). A lone
    request, with nothing else in flight, runs on a second session that uses every core (a second copy of the
    weights). On CUDA one run at a time, of up to 8 images. 3D tasks run in the request's thread on `threads`
    (default: all cores). float16 graphs are cached as `<revision>/<task>.fp16.onnx` and int8 graphs (calibrated on
    the repo's golden input and phantoms, gated against float32) as `<revision>/<task>.int8.onnx`, beside and never
    in place of the float32 ones; each file is exported once, under a file lock, by whichever of `workers` worker
    processes comes first. The `workers` processes of one service share the cores: each takes cores / workers."""
    if fp16 and int8:
        raise InputError("a service serves float16 or int8 graphs, not both: drop --fp16 or --int8")
    repo_dir = resolve_repo(model_id)
    revision = repo_revision(repo_dir)
    processor = MedicalImageProcessor.from_pretrained(repo_dir)
    model = ServedModel(model_id, repo_dir, revision, read_config(repo_dir), processor)
    batched = processor.spatial_dims == 2
    cores = max(1, default_threads() // max(1, workers))
    cpu_runners = runners or cores + 1
    if batched and not threads:
        threads = max(1, cores // cpu_runners)
    for task in available_tasks(repo_dir):
        path = task_graph(repo_dir, model_id, revision, task, onnx_cache, fp16=fp16, int8=int8, processor=processor)
        session = model.sessions[task] = create_session(path, threads, device)
        if batched:
            on_cuda = active_provider(session) == CUDA
            wide = create_session(path, cores, device) if not on_cuda and threads < cores else None
            model.batchers[task] = MicroBatcher(
                pixels_runner(session),
                max_batch_size=max_batch or (8 if on_cuda else 2),
                workers=(runners or 1) if on_cuda else cpu_runners,
                solo=None if wide is None else pixels_runner(wide),
            )
    return model


def task_graph(
    repo_dir: Path,
    model_id: str,
    revision: str,
    task: str,
    onnx_cache: Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    processor: MedicalImageProcessor | None = None,
) -> Path:
    """The cached graph of `task` in the wanted precision, exported (and checked) on first use; int8 from the fp32."""
    folder = onnx_cache / revision
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / f"{task}.onnx"
    wanted = folder / (f"{task}.int8.onnx" if int8 else f"{task}.fp16.onnx" if fp16 else f"{task}.onnx")
    for path in dict.fromkeys([fp32, wanted] if int8 else [wanted]):
        with FileLock(str(path) + ".lock"):  # several workers may start at once: one exports, the others wait
            int8_graph = path.name.endswith(".int8.onnx")
            if path.is_file() and (not int8_graph or saturation_free(path)):  # older int8 caches are rebuilt
                continue
            if int8_graph:
                export_int8(
                    repo_dir,
                    task,
                    path,
                    repo_id=model_id,
                    revision=revision,
                    processor=processor or MedicalImageProcessor.from_pretrained(repo_dir),
                    fp32_path=fp32,
                )
            else:
                export_onnx(repo_dir, task, path, repo_id=model_id, revision=revision, fp16=fp16)
            logger.info("exported the %s graph of %s to the ONNX cache as %s", task, model_id, path.name)
    return wanted
