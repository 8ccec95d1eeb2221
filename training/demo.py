"""`medhub demo`: small models trained on the synthetic phantoms and published into the local Hugging Face cache.

Steps (each with a progress bar): write the phantoms and a manifest whose validation split holds both label
values; train the tiny MUSCLE recipe (MoCo, then continual learning over nodule classification and lung
segmentation) and publish its encoder; fine-tune its two task heads (`medhub finetune`, so their cards carry
validation metrics) and publish them; fine-tune a randomly initialised 3D MACL U-Net
(`macl-unet3d-tiny`) to segment the liver in the CT phantoms and publish it. `models.txt` (one repo id per line)
is written last, so its presence means a complete demo; a later call with every listed id still in the cache
does nothing unless `force`.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import yaml
from huggingface_hub import snapshot_download

from hub.catalogue import get_variant
from hub.data.manifest import load_manifest, write_manifest
from hub.data.phantoms import generate
from hub.errors import MedhubError
from hub.export import export_variant, install_in_cache, random_init, validate_repo_id, verify_checksums
from hub.io import read_image

from .errors import TrainingConfigError
from .finetune import TaskSpec, finetune
from .launch import train

MODELS_FILE = "models.txt"
CT_VARIANT = "macl-unet3d-tiny"
ENCODER, CLASSIFIER = "muscle-resnet18-tiny-xray", "muscle-resnet18-tiny-nodule-classifier"
SEGMENTER, LIVER = "muscle-resnet18-tiny-lung-segmenter", f"{CT_VARIANT}-ct-liver"
# The MUSCLE recipe's continual tasks on the X-ray phantoms, in their order of every round (nodule classification
# first); benchmarks/fidelity_muscle.py trains on the same tasks.
MUSCLE_TASKS = [
    {
        "name": "nodule-classification",
        "kind": "classification",
        "label": "nodule",
        "class_names": ["no nodule", "nodule"],
    },
    {
        "name": "lung-segmentation",
        "kind": "segmentation",
        "class_names": ["background", "lung", "nodule"],
        "head": {"aspp_channels": 16},
    },
]


@dataclass(frozen=True)
class DemoSizes:
    """How much data and training the demo uses (the defaults take a few minutes on a 2-core CPU)."""

    n_xray: int = 48
    n_ct: int = 6
    moco_steps: int = 60
    rounds: int = 3
    steps_per_task: int = 15
    xray_epochs: int = 20
    ct_epochs: int = 25


def _log(message: str) -> None:
    print(f"medhub demo: {message}", file=sys.stderr, flush=True)


def demo_manifest(folder: Path, sizes: DemoSizes, progress: bool) -> Path:
    """Phantoms under `folder` and `demo.jsonl`: per modality, every third image (alternating labels) is `val`."""
    generate(folder, seed=0, n_xray=sizes.n_xray, n_ct=sizes.n_ct, n_mri=0, n_pathology=0, progress=progress)
    rows, seen = [], {}
    for row in load_manifest(folder / "manifest.jsonl"):
        index = seen[row.modality] = seen.get(row.modality, -1) + 1
        rows.append(dataclasses.replace(row, split="val" if index % 3 == 2 else "train"))
    return write_manifest(rows, folder / "demo.jsonl")


def _muscle_config(sizes: DemoSizes, progress: bool) -> dict:
    return {
        "engine": {"progress": progress, "checkpoint_every": 10_000, "log_every": 10},
        "moco": {"steps": sizes.moco_steps},
        "continual": {"rounds": sizes.rounds, "steps_per_task": sizes.steps_per_task, "tasks": MUSCLE_TASKS},
    }


def _random_repo(variant_id: str, out: Path) -> Path:
    variant = get_variant(variant_id)
    model, provenance = random_init(variant, 0)
    return export_variant(model, out, variant, provenance, overwrite=True)


def build_muscle(work: Path, sizes: DemoSizes, progress: bool) -> tuple[Path, Path]:
    """Write the phantoms and train the tiny MUSCLE recipe under `work/runs` (cleared first); returns the demo
    manifest and the folder of the recipe's exported repos (`encoder` is the demo's MUSCLE encoder)."""
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    _log("writing the synthetic phantoms")
    manifest = demo_manifest(work / "phantoms", sizes, progress)
    write_examples(manifest, work / "examples")

    _log("training MUSCLE (tiny): MoCo, then continual nodule classification and lung segmentation")
    config = runs / "muscle.yaml"
    config.write_text(yaml.safe_dump(_muscle_config(sizes, progress)))
    train("muscle", [manifest], runs / "muscle", preset="tiny", config_file=config, progress=progress)
    return manifest, runs / "muscle" / "repos"


def build(work: Path, org: str, sizes: DemoSizes, progress: bool, only: str | None = None) -> dict[str, Path]:
    """Train every demo model under `work/runs` (with `only="muscle"`, the MUSCLE encoder alone); returns repo
    name -> repo folder."""
    manifest, muscle = build_muscle(work, sizes, progress)
    if only == "muscle":
        return {ENCODER: muscle / "encoder"}
    runs = work / "runs"
    xray_config = runs / "xray.yaml"
    schedule = {"epochs": sizes.xray_epochs, "optim": {"batch_size": 8}}  # batch 8: steadier BatchNorm statistics
    xray_config.write_text(yaml.safe_dump({"progress": progress, "classification": schedule, "segmentation": schedule}))
    _log("fine-tuning the MUSCLE nodule classifier and lung segmenter on the X-ray phantoms")
    nodule = TaskSpec("classification", ("no nodule", "nodule"), label="nodule")
    classifier = finetune(
        muscle / "nodule-classification",
        nodule,
        manifest,
        runs / "nodule-classifier",
        config_file=xray_config,
        repo_id=f"{org}/{CLASSIFIER}",
        progress=progress,
    )
    lungs = TaskSpec("segmentation", ("background", "lung", "nodule"))
    segmenter = finetune(
        muscle / "lung-segmentation",
        lungs,
        manifest,
        runs / "lung-segmenter",
        config_file=xray_config,
        repo_id=f"{org}/{SEGMENTER}",
        progress=progress,
    )
    _log(f"nodule classifier: validation {_shown(classifier.metrics)}; lung segmenter: {_shown(segmenter.metrics)}")

    _log(f"fine-tuning {CT_VARIANT} to segment the liver in the CT phantoms")
    start = _random_repo(CT_VARIANT, runs / f"{CT_VARIANT}-init")
    ct_config = runs / "ct.yaml"
    ct_config.write_text(
        yaml.safe_dump({"progress": progress, "segmentation": {"epochs": sizes.ct_epochs, "patience": 8}})
    )
    liver = TaskSpec("segmentation", ("background", "liver"), mask_map={1: 0, 2: 1, 3: 1})
    ct = finetune(
        start, liver, manifest, runs / "ct-liver", config_file=ct_config, repo_id=f"{org}/{LIVER}", progress=progress
    )
    _log(f"3D liver segmenter: validation {_shown(ct.metrics)}")
    return {
        ENCODER: muscle / "encoder",
        CLASSIFIER: classifier.repo_dir,
        SEGMENTER: segmenter.repo_dir,
        LIVER: ct.repo_dir,
    }


def write_examples(manifest: Path, out: Path) -> list[Path]:
    """One validation X-ray (DICOM) and one validation CT (a DICOM series, written as a single NIfTI file so it
    can be uploaded) for the service's printed curl examples."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for row in load_manifest(manifest) if row.split == "val"]
    xray = next(row for row in rows if row.modality == "xray").resolve(manifest.parent)[0]
    ct = next(row for row in rows if row.modality == "ct").resolve(manifest.parent)[0]
    shutil.copyfile(xray, out / "chest.dcm")
    sitk.WriteImage(read_image(ct).to_sitk(), str(out / "ct.nii.gz"), useCompression=True)
    return [out / "chest.dcm", out / "ct.nii.gz"]


def _shown(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in metrics.items() if not name.startswith("dice_class"))


def _cached(repo_id: str) -> bool:
    """Whether `repo_id` is complete in the local cache (no network: files present and matching their checksums)."""
    try:
        verify_checksums(Path(snapshot_download(repo_id, local_files_only=True)))
    except (MedhubError, OSError, ValueError):
        return False
    return True


def published_ids(work: Path) -> list[str] | None:
    """The ids of a complete earlier demo whose repos are all still in the cache, else None."""
    listing = Path(work) / MODELS_FILE
    if not listing.is_file():
        return None
    ids = listing.read_text().split()
    return ids if ids and all(_cached(repo_id) for repo_id in ids) else None


def run_demo(
    work: Path,
    org: str = "demo",
    force: bool = False,
    progress: bool = True,
    sizes: DemoSizes = DemoSizes(),
    only: str | None = None,
    cache_dir: Path | None = None,
) -> list[str]:
    """Build and publish the demo models (or find them already published) into the HF cache (`cache_dir`, else
    the default one); return their repo ids. `only="muscle"` builds and publishes the MUSCLE encoder alone and
    leaves `models.txt` (the list of a complete demo) as it is."""
    if only not in (None, "muscle"):
        raise TrainingConfigError(f"demo part {only!r} is not known; the one part that builds alone is 'muscle'")
    work = Path(work).expanduser()
    validate_repo_id(f"{org}/demo")
    if only is None and not force and (ids := published_ids(work)) is not None:
        _log(f"the demo models in {work / MODELS_FILE} are already in the cache; pass --force to rebuild")
        return ids
    work.mkdir(parents=True, exist_ok=True)
    if only is None:
        (work / MODELS_FILE).unlink(missing_ok=True)
    ids = []
    for name, repo_dir in build(work, org, sizes, progress, only).items():
        ids.append(install_in_cache(repo_dir, f"{org}/{name}", cache_dir).repo_id)
    if only is None:
        (work / MODELS_FILE).write_text("".join(f"{repo_id}\n" for repo_id in ids))
    return ids
