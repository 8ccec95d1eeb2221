"""One unit: a backbone fine-tuned (or its head trained on a frozen encoder) on a label fraction of a task's
train rows, with early stopping on `val`, scored on `test`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from hub.catalogue import get_variant
from hub.data.manifest import load_manifest, write_manifest
from hub.embed import embed_batches, get_backend, list_sources
from hub.export import Provenance, export_repo, resolve_repo
from hub.models import get_family
from hub.processing.processor import MedicalImageProcessor
from training.config import load_recipe_config
from training.errors import TrainingConfigError
from training.finetune import (
    Finetuner,
    FinetuneSettings,
    TaskData,
    classification_metrics,
    default_task,
    load_head_model,
)
from training.launch import seed_everything

from .imagenet import PREFIX as IMAGENET_PREFIX
from .imagenet import TIMM_PREFIX, imagenet_repo, timm_repo
from .study import LINEAR_BACKENDS, Study, Unit

GENERATED = ("random:", IMAGENET_PREFIX, TIMM_PREFIX)  # backbones medhub writes as repo folders under the work dir


def backbone_repo(source: str, cache: Path, seed: int | None = None) -> Path:
    """A repo folder for a study backbone: a folder or ORG/NAME as it is, `random:<variant>` (initialised with
    `seed`, 0 when None), `torchvision:resnet50[=FILE]` and `timm:<name>[=FILE]` (ImageNet baselines) written
    once."""
    if source.startswith(IMAGENET_PREFIX):
        name = source.removeprefix(IMAGENET_PREFIX).partition("=")[0]
        return imagenet_repo(source, cache / f"torchvision-{name}")
    if source.startswith(TIMM_PREFIX):
        name = source.removeprefix(TIMM_PREFIX).partition("=")[0]
        return timm_repo(source, cache / f"timm-{name}")
    if source.startswith("random:"):
        variant = get_variant(source.removeprefix("random:"))
        folder = cache / (f"random-{variant.id}" if seed is None else f"random-{variant.id}-seed{seed}")
        if not (folder / "config.json").is_file():
            torch.manual_seed(seed or 0)
            model = get_family(variant.family).encoder_class(variant.build_config())
            partial = folder.with_name(f"{folder.name}.{os.getpid()}")
            export_repo(
                model,
                partial,
                variant=variant.id,
                processor=variant.build_processor(),
                modality=variant.modality,
                overwrite=True,
                provenance=Provenance(
                    kind="random-init",
                    description=f"random initialisation (seed {seed or 0})",
                    details={"seed": str(seed or 0)},
                ),
            )
            _move_into_place(partial, folder)
        return folder
    return resolve_repo(source)


def _move_into_place(partial: Path, folder: Path) -> None:
    """Rename a finished repo folder into place; a parallel unit that wrote the same repo first wins."""
    try:
        os.replace(partial, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(partial)


def stratified_train(splits: list[str | None], labels: list[Any], fraction: float, seed: int) -> set[int]:
    """Indices of a `fraction` of the train rows, per label value (at least one each), drawn with `seed`."""
    train = [i for i, split in enumerate(splits) if split == "train"]
    if fraction >= 1.0:
        return set(train)
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i in train:
        groups.setdefault(labels[i], []).append(i)
    keep = set()
    for members in groups.values():
        count = max(1, round(fraction * len(members)))
        keep.update(int(i) for i in rng.choice(members, size=count, replace=False))
    return keep


def stratified_subset(manifest: Path, label: str | None, fraction: float, seed: int, out: Path) -> Path:
    """`manifest` with a `fraction` of its train rows (`stratified_train`); other splits kept whole."""
    if fraction >= 1.0:
        return manifest
    rows = load_manifest(manifest)
    keep = stratified_train(
        [r.split for r in rows], [r.labels.get(label) if label else None for r in rows], fraction, seed
    )
    chosen = [row for i, row in enumerate(rows) if row.split != "train" or i in keep]
    chosen = [
        dataclasses.replace(
            row,
            path=str((manifest.parent / row.path).resolve()),
            mask=str((manifest.parent / row.mask).resolve()) if row.mask else None,
        )
        for row in chosen
    ]
    return write_manifest(chosen, out)


def dataset_features(repo: Path, manifest: Path, cache: Path, backend: str = "torch") -> dict[str, Any]:
    """The encoder's pooled embedding of every manifest row (hub.embed with the named backend), computed once per
    backbone, task and backend."""
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        return {"ids": list(stored["ids"]), "embeddings": stored["embeddings"]}
    sources = list_sources(manifest)
    ids, embeddings = [], []
    for batch in embed_batches(repo, sources, backend=get_backend(backend)):
        if batch.errors:
            raise TrainingConfigError(
                f"{manifest.name}: could not embed {batch.errors[0].id}: {batch.errors[0].message}"
            )
        ids += batch.ids
        embeddings.append(batch.embeddings)
    features = {"ids": ids, "embeddings": np.concatenate(embeddings)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.npz")
    np.savez(partial, ids=np.asarray(ids), embeddings=features["embeddings"])
    os.replace(partial, cache)
    return features


def linear_probe(features: dict[str, Any], manifest: Path, label: str, fraction: float, seed: int) -> dict[str, Any]:
    """Logistic regression (scikit-learn, lbfgs, C=1, seeded) on the frozen train features of a label fraction,
    scored on the test rows."""
    rows = {row.path: row for row in load_manifest(manifest)}
    order = [rows[i] for i in features["ids"]]
    labels = np.asarray([int(row.labels[label]) for row in order])
    keep = sorted(stratified_train([r.split for r in order], list(labels), fraction, seed))
    test = np.asarray([r.split == "test" for r in order])
    x = features["embeddings"]
    model = LogisticRegression(max_iter=5000, random_state=seed).fit(x[keep], labels[keep])
    probabilities = model.predict_proba(x[test])
    full = np.zeros((len(probabilities), int(labels.max()) + 1))
    full[:, model.classes_] = probabilities
    return {
        "metrics": classification_metrics(full, labels[test]),
        "n_train": len(keep),
        "n_test": int(test.sum()),
        "best_epoch": None,
        "epochs_run": None,
    }


def run_unit(study: Study, unit: Unit, work: Path) -> dict[str, Any]:
    """Train and score one unit; the row written to results.jsonl."""
    started = time.time()
    entry = study.tasks[unit.task]
    source = study.backbones[unit.backbone]
    # scratch is a fresh initialisation per run (seeded by the run), as the study trains its random-init arm
    scratch = source.startswith("random:")
    repo = backbone_repo(source, work / "backbones", unit.seed if scratch else None)
    processor = MedicalImageProcessor.from_pretrained(repo)
    task = default_task(
        entry.kind, entry.manifest, processor.modality, entry.label, list(entry.classes) or None, entry.mask_map
    )
    if unit.protocol in LINEAR_BACKENDS:
        if task.kind != "classification":
            raise TrainingConfigError(f"task {unit.task!r}: the {unit.protocol} protocol needs a classification task")
        backend = LINEAR_BACKENDS[unit.protocol]
        name = (f"{unit.backbone}-seed{unit.seed}" if scratch else unit.backbone) + f"_{unit.task}"
        cache = work / "features" / f"{name}{'' if backend == 'torch' else '_' + backend}.npz"
        features = dataset_features(repo, entry.manifest, cache, backend)
        result = linear_probe(features, entry.manifest, task.label, unit.fraction, unit.seed)
        return {
            "key": unit.key,
            **dataclasses.asdict(unit),
            **result,
            "revision": _revision(repo),
            "seconds": round(time.time() - started, 3),
        }
    unit_dir = work / "units" / unit.key.replace("|", "_")
    unit_dir.mkdir(parents=True, exist_ok=True)
    manifest = stratified_subset(entry.manifest, task.label, unit.fraction, unit.seed, unit_dir / "manifest.jsonl")
    settings = load_recipe_config(FinetuneSettings, "finetune", study.preset, study.config)
    seed_everything(unit.seed)
    head = load_head_model(repo, task, unit.seed)
    train, val, test = (TaskData(manifest, split, processor, task) for split in ("train", "val", "test"))
    tuner = Finetuner(head, train, val, task, getattr(settings, task.kind), unit.seed, unit.protocol == "frozen-head")
    _, best_epoch, epochs_run = tuner.run(progress=False)
    tuner.val_data = test
    _, metrics = tuner.validate()
    metrics.pop("val_loss")
    return {
        "key": unit.key,
        **dataclasses.asdict(unit),
        "metrics": metrics,
        "n_train": len(train),
        "n_test": len(test),
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "revision": _revision(repo),
        "seconds": round(time.time() - started, 3),
    }


def _revision(repo: Path) -> str | None:
    """The commit sha of a repo in the Hugging Face cache (its snapshot folder's name), else None."""
    resolved = repo.resolve()
    return resolved.name if resolved.parent.name == "snapshots" else None
