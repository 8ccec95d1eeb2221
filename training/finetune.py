"""Fine-tuning any medhub repo on a labelled manifest: classification or segmentation, full or frozen encoder.

The model is the repo's family head class loaded from the repo (`from_pretrained`: the encoder, and any head or
decoder weights whose names and shapes match, come from the repo; the rest is initialised with the run's seed).
Training reads the manifest's `train` rows through the repo's own processor, validates on its `val` rows every
epoch, keeps the weights of the lowest validation loss and stops early (the benchmarking study's protocol; the
hyper-parameters are in `training/recipes/finetune.yaml`). The result is a task repo whose config carries the
labels and whose card's `model-index` carries the validation metrics (AUC and accuracy, or Dice).
`freeze` trains the head only (linear probe / frozen encoder): the encoder's parameters get no gradient and its
normalisation layers stay in eval mode, so its weights and running statistics are left exactly as loaded.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from hub.errors import MedhubError
from hub.export import Provenance, export_repo, resolve_repo, weights_metadata
from hub.export.resolve import read_config
from hub.models import get_family
from hub.processing.processor import MedicalImageProcessor

from .config import AugmentSettings, OptimSettings, load_recipe_config
from .data import ManifestDataset, Target, augment, collate, read_split, sample_generator
from .engine import make_optimizer, warmup_cosine
from .errors import TrainingConfigError
from .heads import encoder_of, head_class, label_config
from .launch import seed_everything

TASK_TYPES = {"classification": "image-classification", "segmentation": "image-segmentation"}


@dataclass
class FinetuneTaskSettings:
    """Schedule of one task kind: `plateau` halves the LR when the validation loss stalls; `cosine` decays it per
    epoch. Early stopping after more than `patience` epochs without a lower validation loss. Segmentation loss:
    `dice_weight` x soft Dice + `ce_weight` x the head's cross-entropy."""

    epochs: int = 100
    patience: int = 10
    schedule: str = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    plateau_threshold: float = 1e-4
    dice_weight: float = 0.0
    ce_weight: float = 1.0
    optim: OptimSettings = field(default_factory=OptimSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    def __post_init__(self) -> None:
        if self.schedule not in ("plateau", "cosine"):
            raise TrainingConfigError(f"schedule {self.schedule!r} is not one of plateau, cosine")
        if self.epochs < 1 or self.patience < 0:
            raise TrainingConfigError(f"epochs must be >= 1 and patience >= 0, got {self.epochs} and {self.patience}")


@dataclass
class FinetuneSettings:
    seed: int = 0
    progress: bool = True
    classification: FinetuneTaskSettings = field(default_factory=FinetuneTaskSettings)
    segmentation: FinetuneTaskSettings = field(default_factory=FinetuneTaskSettings)


@dataclass(frozen=True)
class TaskSpec:
    """What to learn: `kind`, class names, the manifest `labels` key (classification) and, for segmentation, a
    map from mask values to class indices (unmapped values keep their own index)."""

    kind: str
    class_names: tuple[str, ...]
    label: str | None = None
    mask_map: dict[int, int] = field(default_factory=dict)


@dataclass
class FinetuneResult:
    repo_dir: Path
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int


def default_task(
    kind: str,
    manifest: Path,
    modality: str,
    label: str | None = None,
    class_names: list[str] | None = None,
    mask_map: dict[int, int] | None = None,
) -> TaskSpec:
    """Fill what the user left out: the only label key of the manifest, and class names of its label values
    (`no <label>`, `<label>` when binary). Segmentation needs the class names (mask value = class index)."""
    if kind not in TASK_TYPES:
        raise TrainingConfigError(f"task {kind!r} is not one of {', '.join(TASK_TYPES)}")
    if kind == "segmentation":
        if not class_names:
            raise TrainingConfigError("segmentation needs --classes: one name per class, index = (mapped) mask value")
        return TaskSpec(kind, tuple(class_names), mask_map=dict(mask_map or {}))
    rows = read_split(manifest, "train", modality).rows
    if label is None:
        keys = set.intersection(*(set(row.labels) for _, row in rows))
        if len(keys) != 1:
            raise TrainingConfigError(
                f"manifest {manifest.name!r}: choose the label to learn "
                f"with --label (rows share {sorted(keys) or 'none'})"
            )
        (label,) = keys
    if not class_names:
        count = int(max(row.labels.get(label, 0) for _, row in rows)) + 1
        class_names = [f"no {label}", label] if count <= 2 else [f"{label} {i}" for i in range(count)]
    return TaskSpec(kind, tuple(class_names), label=label)


# ----- data -----------------------------------------------------------------------------------------------


class TaskData:
    """One split's preprocessed samples with their targets (mask values mapped to class indices)."""

    def __init__(self, manifest: Path, split: str, processor: MedicalImageProcessor, task: TaskSpec):
        rows = read_split(manifest, split, processor.modality)
        self.lut: torch.Tensor | None = None
        if task.kind == "segmentation" and task.mask_map:
            size = max(max(task.mask_map) + 1, len(task.class_names))
            lut = torch.arange(size)
            for value, index in task.mask_map.items():
                lut[value] = index
            if int(lut.max()) >= len(task.class_names):
                raise TrainingConfigError(
                    f"mask values map to class {int(lut.max())} but only {len(task.class_names)} classes are named "
                    f"({', '.join(task.class_names)}); map every mask value above {len(task.class_names) - 1}"
                )
            self.lut = lut
            target = Target("segmentation", tuple(f"mask value {v}" for v in range(size)))
        else:
            target = Target(task.kind, task.class_names, task.label)
        self.dataset = ManifestDataset(rows, processor, target)

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int) -> dict[str, Any]:
        item = self.dataset.sample(index)
        if self.lut is not None:
            item = {**item, "labels": self.lut[item["labels"]]}
        return item


def epoch_batches(size: int, batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Shuffled (or ordered) index batches; a last batch of one joins the one before, as BatchNorm needs two."""
    order = torch.randperm(size, generator=generator).tolist() if generator is not None else list(range(size))
    batches = [order[i : i + batch_size] for i in range(0, size, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


# ----- losses and metrics ---------------------------------------------------------------------------------


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over foreground classes of (2 sum(p y) + smooth) / (sum p + sum y + smooth), pooled over the batch."""
    probabilities = logits.softmax(dim=1)
    one_hot = F.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    dims = [0] + list(range(2, logits.ndim))
    intersection = (probabilities * one_hot).sum(dims)
    dice = (2 * intersection + smooth) / (probabilities.sum(dims) + one_hot.sum(dims) + smooth)
    return 1 - dice[1:].mean()


def task_loss(output: Any, labels: torch.Tensor, kind: str, settings: FinetuneTaskSettings) -> torch.Tensor:
    if kind == "classification" or settings.dice_weight == 0:
        return output.loss
    dice = soft_dice_loss(output.logits, labels)
    return dice * settings.dice_weight + (output.loss * settings.ce_weight if settings.ce_weight else 0.0)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, and ROC AUC (one-vs-rest macro average for more than two classes) when every class occurs."""
    metrics = {"accuracy": float((probabilities.argmax(1) == labels).mean())}
    classes = probabilities.shape[1]
    if len(np.unique(labels)) == classes:
        if classes == 2:
            metrics["roc_auc"] = float(roc_auc_score(labels, probabilities[:, 1]))
        else:
            metrics["roc_auc"] = float(
                roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(classes)))
            )
    return metrics


def dice_scores(counts: np.ndarray) -> dict[str, float]:
    """Per-class Dice from pooled (intersection, predicted, true) counts; `dice` = mean over foreground classes
    that occur in the predictions or the truth."""
    intersection, predicted, true = counts
    present = (predicted + true) > 0
    per_class = np.where(present, 2 * intersection / np.maximum(predicted + true, 1), np.nan)
    foreground = per_class[1:][present[1:]]
    metrics = {"dice": float(foreground.mean()) if foreground.size else float("nan")}
    metrics.update({f"dice_class_{c}": float(v) for c, v in enumerate(per_class) if c > 0 and present[c]})
    return metrics


# ----- the loop -------------------------------------------------------------------------------------------


class Finetuner:
    """Train `model` on `train`, validate on `val` each epoch, keep the best weights, stop early."""

    def __init__(
        self,
        model: PreTrainedModel,
        train: TaskData,
        val: TaskData,
        task: TaskSpec,
        settings: FinetuneTaskSettings,
        seed: int,
        freeze: bool,
    ):
        self.model, self.train_data, self.val_data, self.task = model, train, val, task
        self.settings, self.seed, self.freeze = settings, seed, freeze
        self.encoder = encoder_of(model)
        if freeze:
            for parameter in self.encoder.parameters():
                parameter.requires_grad_(False)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.parameters, settings.optim)
        if settings.schedule == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer,
                mode="min",
                factor=settings.plateau_factor,
                patience=settings.plateau_patience,
                threshold=settings.plateau_threshold,
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(settings.epochs, 0, 0.0))

    def _set_mode(self, training: bool) -> None:
        self.model.train(training)
        if self.freeze:
            self.encoder.eval()

    def _batch(self, data: TaskData, indices: list[int], epoch: int | None) -> dict[str, Any]:
        items = [data.item(i) for i in indices]
        if epoch is not None:
            items = [
                augment(item, self.settings.augment, sample_generator(self.seed, epoch, i))
                for item, i in zip(items, indices)
            ]
        return collate(items)

    def train_epoch(self, epoch: int) -> float:
        self._set_mode(True)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        total, count = 0.0, 0
        for indices in epoch_batches(len(self.train_data), self.settings.optim.batch_size, generator):
            batch = self._batch(self.train_data, indices, epoch)
            output = self.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            loss = task_loss(output, batch["labels"], self.task.kind, self.settings)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch + 1}: loss is {loss.item()}; lower the learning rate")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, count = total + float(loss.detach()) * len(indices), count + len(indices)
        return total / count

    @torch.no_grad()
    def validate(self) -> tuple[float, dict[str, float]]:
        self._set_mode(False)
        total, outputs, labels = 0.0, [], []
        classes = len(self.task.class_names)
        counts = np.zeros((3, classes))
        for indices in epoch_batches(len(self.val_data), self.settings.optim.batch_size, None):
            batch = self._batch(self.val_data, indices, None)
            output = self.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            total += float(task_loss(output, batch["labels"], self.task.kind, self.settings)) * len(indices)
            if self.task.kind == "classification":
                outputs.append(output.logits.softmax(1).numpy())
                labels.append(batch["labels"].numpy())
            else:
                predicted = output.logits.argmax(1).flatten()
                true = batch["labels"].flatten()
                counts[0] += torch.bincount(true[predicted == true], minlength=classes).numpy()
                counts[1] += torch.bincount(predicted, minlength=classes).numpy()
                counts[2] += torch.bincount(true, minlength=classes).numpy()
        loss = total / len(self.val_data)
        if self.task.kind == "classification":
            metrics = classification_metrics(np.concatenate(outputs), np.concatenate(labels))
        else:
            metrics = dice_scores(counts)
        return loss, {"val_loss": loss, **metrics}

    def run(self, progress: bool, log: Path | None = None) -> tuple[dict[str, float], int, int]:
        """Train to the end or the early stop; load the best weights; return their metrics, epoch and epochs run."""
        best_loss, best_state, best_metrics, best_epoch, waited = math.inf, None, {}, 0, 0
        bar = tqdm(range(self.settings.epochs), desc=f"finetune {self.task.kind}", unit="epoch", disable=not progress)
        epoch = 0
        for epoch in bar:
            train_loss = self.train_epoch(epoch)
            val_loss, metrics = self.validate()
            lr = self.optimizer.param_groups[0]["lr"]
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(val_loss)
            else:
                self.scheduler.step()
            if log is not None:
                with open(log, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps({"epoch": epoch + 1, "train_loss": train_loss, "lr": lr, **metrics}) + "\n")
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            if val_loss < best_loss:
                best_loss, best_metrics, best_epoch, waited = val_loss, metrics, epoch + 1, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                waited += 1
                if waited > self.settings.patience:
                    break
        bar.close()
        self.model.load_state_dict(best_state)
        return best_metrics, best_epoch, epoch + 1


# ----- the command ----------------------------------------------------------------------------------------


def load_head_model(repo_dir: Path, task: TaskSpec, seed: int) -> PreTrainedModel:
    """The family's head for `task.kind`, loaded from the repo with the task's labels (new head weights seeded)."""
    model_type = read_config(repo_dir).get("model_type")
    if model_type is None:
        raise TrainingConfigError(f"config.json in {repo_dir} has no model_type")
    cls = head_class(get_family(model_type), task.kind, task.kind)
    torch.manual_seed(seed)
    return cls.from_pretrained(repo_dir, ignore_mismatched_sizes=True, **label_config(list(task.class_names)))


def _eval_results(task: TaskSpec, metrics: dict[str, float], manifest: Path) -> list[dict[str, Any]]:
    names = ("roc_auc", "accuracy") if task.kind == "classification" else ("dice",)
    return [
        {
            "task_type": TASK_TYPES[task.kind],
            "dataset_name": f"{manifest.stem} (val split)",
            "dataset_type": manifest.stem,
            "dataset_split": "val",
            "metric_type": name,
            "metric_value": metrics[name],
        }
        for name in names
        if name in metrics and math.isfinite(metrics[name])
    ]


def finetune(
    model: str | Path,
    task: TaskSpec,
    manifest: Path,
    out: Path,
    *,
    preset: str = "tiny",
    config_file: Path | None = None,
    freeze: bool = False,
    repo_id: str | None = None,
    progress: bool | None = None,
) -> FinetuneResult:
    """Fine-tune `model` (a repo folder or ORG/NAME) on `manifest` and write the task repo to `out/repo`."""
    settings = load_recipe_config(FinetuneSettings, "finetune", preset, config_file)
    task_settings = getattr(settings, task.kind)
    repo_dir = resolve_repo(model)
    processor = MedicalImageProcessor.from_pretrained(repo_dir)
    seed_everything(settings.seed)
    head = load_head_model(repo_dir, task, settings.seed)
    train_data = TaskData(Path(manifest), "train", processor, task)
    val_data = TaskData(Path(manifest), "val", processor, task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "metrics.jsonl"
    log.unlink(missing_ok=True)
    tuner = Finetuner(head, train_data, val_data, task, task_settings, settings.seed, freeze)
    metrics, best_epoch, epochs_run = tuner.run(settings.progress if progress is None else progress, log)
    source = weights_metadata(repo_dir / "model.safetensors")
    base = str(model) if not Path(model).is_dir() else None
    what = "linear probe (frozen encoder)" if freeze else "full fine-tuning"
    provenance = Provenance(
        kind="trained",
        description=(
            f"{what} of {base or f'the local repo {Path(model).name}'} ({source.get('variant', 'no variant')}) "
            f"for {task.kind} "
            f"({', '.join(task.class_names)}) with medhub finetune (preset {preset}); best validation loss "
            f"at epoch {best_epoch} of {epochs_run}"
        ),
        training_data=(
            f"{len(train_data)} training and {len(val_data)} validation images of {Path(manifest).name} "
            f"(modality {processor.modality})"
        ),
        base_model=base,
        details={
            "recipe": "finetune",
            "task": task.kind,
            "freeze": str(freeze),
            "seed": str(settings.seed),
            "preset": preset,
            "best_epoch": str(best_epoch),
            "settings": json.dumps(asdict(task_settings)),
        },
    )
    repo = export_repo(
        head,
        out / "repo",
        variant=source.get("variant", head.config.model_type),
        provenance=provenance,
        processor=processor,
        modality=processor.modality,
        repo_id=repo_id,
        eval_results=_eval_results(task, metrics, Path(manifest)),
        overwrite=True,
    )
    return FinetuneResult(repo, metrics, best_epoch, epochs_run)


def parse_mask_map(entries: list[str]) -> dict[int, int]:
    """`VALUE=CLASS` entries (e.g. `1=0 2=1 3=1`) as a mapping of ints."""
    mapping = {}
    for entry in entries:
        value, _, index = entry.partition("=")
        if not (value.strip().isdigit() and index.strip().isdigit()):
            raise MedhubError(f"--mask-map entry {entry!r} is not VALUE=CLASS with two non-negative integers")
        mapping[int(value)] = int(index)
    return mapping
