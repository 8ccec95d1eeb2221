"""The study file: backbones, tasks, protocols, label fractions, runs, baseline and seed; and its units."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.errors import TrainingConfigError

PROTOCOLS = ("finetune", "frozen-head", "linear", "linear-int8")
LINEAR_BACKENDS = {"linear": "torch", "linear-int8": "onnx-int8"}
"""The linear-probe protocols and the `hub.embed` backend of their frozen features; `onnx-int8` is the service's
gated int8 graph (installed by `serving`), reported beside `linear` as the int8 - fp32 difference."""
TASK_KINDS = ("classification", "segmentation")

EXAMPLE = """\
# medhub evaluate STUDY.yaml --out DIR: every (backbone, task, protocol, label fraction, run) is one unit.
# Write the phantoms first: medhub phantoms --out phantoms (their manifest is phantoms/manifest.jsonl).
backbones:                     # repo folders or ORG/NAME ids, random:<catalogue variant> for scratch, or
                               # torchvision:resnet50[=FILE] (ImageNet weights from torch's hub cache or FILE)
                               # or timm:<name>[=FILE] (a timm ResNet, e.g. timm:resnet50.a1_in1k, from the
                               # HF cache's timm/<name> or FILE; nothing is downloaded)
  random: random:muscle-resnet18-tiny   # scratch: a fresh initialisation per run, seeded by the run
  muscle: demo/muscle-resnet18-tiny-xray  # the demo encoder (medhub demo)
baseline: random               # every backbone is t-tested against this one
tasks:
  nodule:
    manifest: phantoms/manifest.jsonl   # rows with split train / val / test; metrics are on `test`
    kind: classification                # classification | segmentation
    label: nodule                       # the manifest labels key (classification)
protocols: [finetune, frozen-head]      # finetune: the study's recipe; frozen-head: the encoder frozen;
                                        # linear: logistic regression on frozen features; linear-int8: the same
                                        # on the served int8 graph's features, reported as int8 - fp32 (paired t)
preset: tiny                            # finetune recipe preset: tiny (CPU) or paper (the study's schedule)
label_fractions: [1.0]                  # share of the train rows, sampled per run, stratified by label
runs: 10                                # runs per cell (the study used ten)
seed: 0                                 # unit seeds derive from it
"""


@dataclass(frozen=True)
class TaskEntry:
    name: str
    manifest: Path
    kind: str
    label: str | None = None
    classes: tuple[str, ...] = ()
    mask_map: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """One run: its key is what --resume matches on."""

    backbone: str
    task: str
    protocol: str
    fraction: float
    run: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.backbone}|{self.task}|{self.protocol}|{self.fraction:g}|{self.run}"


@dataclass
class Study:
    backbones: dict[str, str]
    tasks: dict[str, TaskEntry]
    protocols: list[str]
    baseline: str
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    runs: int = 10
    seed: int = 0
    preset: str = "tiny"
    config: Path | None = None

    def units(self) -> list[Unit]:
        units = []
        for backbone in self.backbones:
            for t, task in enumerate(self.tasks):
                for protocol in self.protocols:
                    for fraction in self.label_fractions:
                        for run in range(self.runs):
                            # the same seed for every backbone of a run: the arms see the same subsample
                            seed = self.seed * 100003 + t * 1009 + run
                            units.append(Unit(backbone, task, protocol, fraction, run, seed))
        return units


def _require(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw:
        raise TrainingConfigError(f"study {path.name!r} has no {key!r} entry")
    return raw[key]


def load_study(path: str | Path) -> Study:
    """Read and check a study file; relative manifest paths resolve against the study file's folder."""
    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"study file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    backbones = _require(raw, "backbones", path)
    if isinstance(backbones, list):
        backbones = {str(b).rsplit("/", 1)[-1].removeprefix("random:"): str(b) for b in backbones}
    if not isinstance(backbones, dict) or not backbones:
        raise TrainingConfigError(f"study {path.name!r}: backbones must be a non-empty mapping NAME: SOURCE")
    tasks = {}
    for name, entry in dict(_require(raw, "tasks", path)).items():
        kind = entry.get("kind", "classification")
        if kind not in TASK_KINDS:
            raise TrainingConfigError(
                f"study {path.name!r} task {name!r}: kind {kind!r} is not one of {', '.join(TASK_KINDS)}"
            )
        manifest = Path(_require(entry, "manifest", path))
        tasks[name] = TaskEntry(
            name,
            manifest if manifest.is_absolute() else path.parent / manifest,
            kind,
            entry.get("label"),
            tuple(entry.get("classes", ())),
            {int(k): int(v) for k, v in dict(entry.get("mask_map", {})).items()},
        )
    protocols = list(raw.get("protocols", ["finetune"]))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise TrainingConfigError(f"study {path.name!r}: protocols {unknown} are not among {', '.join(PROTOCOLS)}")
    baseline = str(raw.get("baseline", next(iter(backbones))))
    if baseline not in backbones:
        raise TrainingConfigError(
            f"study {path.name!r}: baseline {baseline!r} is not one of the backbones {sorted(backbones)}"
        )
    fractions = [float(f) for f in raw.get("label_fractions", [1.0])]
    if any(not 0 < f <= 1 for f in fractions):
        raise TrainingConfigError(f"study {path.name!r}: label_fractions must lie in (0, 1], got {fractions}")
    runs = int(raw.get("runs", 10))
    if runs < 1:
        raise TrainingConfigError(f"study {path.name!r}: runs must be >= 1, got {runs}")
    config = raw.get("config")
    return Study(
        {str(k): str(v) for k, v in backbones.items()},
        tasks,
        protocols,
        baseline,
        fractions,
        runs,
        int(raw.get("seed", 0)),
        str(raw.get("preset", "tiny")),
        (path.parent / config) if config else None,
    )
