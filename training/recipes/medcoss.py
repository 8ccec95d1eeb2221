"""The MedCoSS recipe: continual self-supervised pretraining of one ViT over modalities in a configured order.

Stage k trains on modality `stages[k]` (report `text` from the manifests' `text` field: whole-word MLM; `xray`,
`pathology`: 2D MAE; `ct`, `mri`: 3D MAE) with its own AdamW (betas 0.9/0.95, no decay on biases and 1-D
parameters) and warm-up + cosine. When stage k > 0 starts: the rehearsal buffer of stage k-1's data is chosen by
k-means on mean-pooled features of the model as it ended stage k-1; the encoder is copied into the frozen teacher;
the MAE decoder and the MLM head are re-initialised. Every step reads one single-modality batch, drawn with
replacement from the current data or from one buffer (probability proportional to max(1, size // batch), the
upstream item list's share; upstream drops a buffer smaller than one batch). Current batches get the pretext loss
only; buffer batches, after intra-modal mixup, only the MSE to the teacher's tokens (same MAE noise for both).
With `rehearsal.enabled: false` the same stages run as plain sequential pretraining (no buffer, so no distillation
or mixup): the baseline MedCoSS is compared with (the paper's Fig. 5; `benchmarks/fidelity_medcoss.py`).

The export is the whole pretraining model (`AutoModel` gives the encoder) with the text tokenizer (the one given,
or a WordPiece tokenizer trained on the text stage's reports) and the variant's X-ray processor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from hub.data.manifest import load_manifest
from hub.export import Provenance, export_variant
from hub.export.checksums import write_checksums
from hub.models.medcoss import MedCossForPreTraining, MedCossModel
from hub.processing.presets import preset
from hub.processing.processor import MedicalImageProcessor
from training.config import AugmentSettings, EngineSettings, OptimSettings
from training.data import ManifestDataset, augment, read_split, sample_generator
from training.distributed import DistInfo
from training.engine import ManifestRecipe, Stage
from training.errors import TrainingConfigError
from training.rehearsal import distillation_loss, image_mixup, kmeans_buffer, text_mixup
from training.text import Encoded, encode, load_tokenizer, train_wordpiece, whole_word_mask

MODALITIES = ("text", "xray", "ct", "mri", "pathology")
HEADS = (
    "decoder_embed",
    "decoder_blocks",
    "decoder_norm",
    "decoder_pred_2d",
    "decoder_pred_3d",
    "mlm_position_embeddings",
    "mlm_head",
)


# The recipe's values live in medcoss.yaml only: a field it sets has no default here (tests/test_training_config.py).
@dataclass(kw_only=True)
class RehearsalSettings:
    enabled: bool
    buffer_ratio: float
    center_ratio: float
    mixup: bool
    kmeans_iterations: int
    feature_batch_size: int


@dataclass(kw_only=True)
class MedCossSettings:
    variant: str
    seed: int
    stages: list[str]
    steps_per_stage: int
    tokenizer: str | None
    tokenizer_vocab_size: int
    text_length: int
    mlm_probability: float
    teacher_train_mode: bool
    engine: EngineSettings
    optim: OptimSettings
    augment: AugmentSettings
    rehearsal: RehearsalSettings

    def __post_init__(self) -> None:
        unknown = [m for m in self.stages if m not in MODALITIES]
        if unknown or not self.stages or len(set(self.stages)) != len(self.stages):
            raise TrainingConfigError(f"stages {self.stages} must be distinct modalities from {', '.join(MODALITIES)}")
        for name in ("buffer_ratio", "center_ratio"):
            value = getattr(self.rehearsal, name)
            if not 0.0 < value < 1.0:
                raise TrainingConfigError(f"rehearsal.{name} must be in (0, 1), got {value}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise TrainingConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")


def modality_processor(modality: str, config) -> MedicalImageProcessor:
    """The modality's MedCoSS preset at the config's pretraining input size."""
    if modality in ("xray", "pathology"):
        side = [config.pretraining_image_size] * 2
        return MedicalImageProcessor(**preset(f"medcoss-{modality}", resize=side, size=side))
    return MedicalImageProcessor(**preset(f"medcoss-{modality}", size=list(config.pretraining_volume_size)))


@dataclass
class TextData:
    texts: list[str]
    encoded: Encoded

    def __len__(self) -> int:
        return len(self.texts)


def report_texts(manifests: list[Path]) -> list[str]:
    return [row.text for m in manifests for row in load_manifest(m) if row.split == "train" and row.text]


class ModalityData:
    """One modality's training data and how a batch of given indices is built from it (deterministically)."""

    def __init__(self, modality: str, data: ManifestDataset | ConcatDataset | TextData, recipe: MedCossRecipe):
        self.modality, self.data, self.recipe = modality, data, recipe

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: list[int], keys: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Images: flipped per `augment`; text: whole-word masked. `keys` seed each sample's draws."""
        settings = self.recipe.settings
        if self.modality != "text":
            items = [
                augment(self.data[i], settings.augment, sample_generator(*keys, n, i)) for n, i in enumerate(indices)
            ]
            return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}
        encoded, tokenizer = self.data.encoded, self.recipe.tokenizer
        ids, labels = zip(
            *(
                whole_word_mask(
                    encoded.input_ids[i],
                    encoded.word_ids[i],
                    tokenizer.mask_token_id,
                    len(tokenizer),
                    sample_generator(*keys, n, i),
                    settings.mlm_probability,
                )
                for n, i in enumerate(indices)
            )
        )
        return {
            "input_ids": torch.stack(ids),
            "attention_mask": encoded.attention_mask[indices],
            "labels": torch.stack(labels),
        }

    def features(self, model: MedCossModel, batch_size: int, device: torch.device) -> torch.Tensor:
        """Mean of all final tokens per sample (cls + patches; text: every position, padding included), no
        augmentation, no masking, eval mode."""
        out = []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(self), batch_size):
                indices = list(range(start, min(start + batch_size, len(self))))
                if self.modality == "text":
                    encoded = self.data.encoded
                    states = model(
                        input_ids=encoded.input_ids[indices].to(device),
                        attention_mask=encoded.attention_mask[indices].to(device),
                    ).last_hidden_state
                else:
                    pixels = torch.stack([self.data[i]["pixel_values"] for i in indices]).to(device)
                    states = model(pixel_values=pixels).last_hidden_state
                out.append(states.float().mean(dim=1).cpu())
        return torch.cat(out)


class MedCossNetwork(nn.Module):
    """Everything checkpointed: the pretraining model and the frozen previous-stage encoder (the teacher)."""

    def __init__(self, model: MedCossForPreTraining):
        super().__init__()
        self.model = model
        self.teacher = copy.deepcopy(model.medcoss)
        self.teacher.requires_grad_(False)


class ModalityStage(Stage):
    def __init__(self, index: int, recipe: MedCossRecipe):
        settings = recipe.settings
        self.index, self.recipe, self.modality = index, recipe, settings.stages[index]
        self.name, self.num_steps, self.optim = f"{index + 1}-{self.modality}", settings.steps_per_stage, settings.optim
        self.samples_per_step = settings.optim.batch_size * recipe.dist.world
        self.model, self.teacher = recipe.network.model, recipe.network.teacher

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """timm's `add_weight_decay`: no weight decay on biases and 1-D parameters (norms, layer scales)."""
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def start(self) -> None:
        recipe = self.recipe
        if self.index > 0 and recipe.settings.rehearsal.enabled:
            previous = recipe.settings.stages[self.index - 1]
            rehearsal = recipe.settings.rehearsal
            features = recipe.data[previous].features(
                self.model.medcoss, rehearsal.feature_batch_size, recipe.dist.device
            )
            recipe.buffers[previous] = kmeans_buffer(
                features,
                rehearsal.buffer_ratio,
                rehearsal.center_ratio,
                recipe.settings.seed + self.index,
                rehearsal.kmeans_iterations,
            )
            self.teacher.load_state_dict(self.model.medcoss.state_dict())
        for name in HEADS:
            getattr(self.model, name).apply(self.model._init_weights)
        self.model._init_weights(self.model)

    def sources(self) -> list[tuple[str, list[int]]]:
        """(modality, sample indices) of the current data, then of every earlier stage's buffer (if rehearsing)."""
        recipe = self.recipe
        current = [(self.modality, list(range(len(recipe.data[self.modality]))))]
        if not recipe.settings.rehearsal.enabled:
            return current
        return current + [(m, recipe.buffers[m]) for m in recipe.settings.stages[: self.index]]

    def draw(self, step: int) -> tuple[int, str, list[int]]:
        """(source number, modality, this rank's sample indices) of `step`: a pure function of the step."""
        recipe, batch = self.recipe, self.optim.batch_size
        sources = self.sources()
        generator = sample_generator(recipe.settings.seed, 1 + self.index, step)
        weights = torch.tensor([max(1, len(indices) // batch) for _, indices in sources], dtype=torch.float64)
        source = int(torch.multinomial(weights, 1, generator=generator))
        modality, indices = sources[source]
        picks = torch.randint(len(indices), (batch * recipe.dist.world,), generator=generator).tolist()
        rank = recipe.dist.rank
        return source, modality, [indices[p] for p in picks[rank * batch : (rank + 1) * batch]]

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        recipe = self.recipe
        source, modality, indices = self.draw(step)
        keys = (recipe.settings.seed, 1 + self.index, step)
        batch = {k: v.to(recipe.dist.device) for k, v in recipe.data[modality].batch(indices, keys).items()}
        self.model.train()
        if source == 0:
            loss = self.model(**batch).loss
            return loss, {"source": 0, "pretext_loss": float(loss.detach())}
        self.teacher.train(recipe.settings.teacher_train_mode)
        generator = sample_generator(*keys, 2**20)
        if recipe.settings.rehearsal.mixup:
            if modality == "text":
                batch["input_ids"], batch["attention_mask"], _ = text_mixup(
                    batch["input_ids"], batch["attention_mask"], generator
                )
            else:
                batch["pixel_values"], _, _ = image_mixup(batch["pixel_values"], generator)
        batch.pop("labels", None)
        noise = None
        if modality != "text":
            patches = self.model.medcoss.image_embeddings.check(batch["pixel_values"])
            noise = torch.rand((len(indices), int(torch.tensor(patches).prod())), device=recipe.dist.device)
        loss = distillation_loss(self.model, self.teacher, batch, noise)
        return loss, {"source": source, "distillation_loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {m: list(v) for m, v in self.recipe.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recipe.buffers.clear()
        self.recipe.buffers.update({m: list(v) for m, v in state["buffers"].items()})


class MedCossRecipe(ManifestRecipe):
    name = "medcoss"

    def __init__(self, settings: MedCossSettings, manifests: list[Path], dist: DistInfo):
        super().__init__(settings, manifests, dist)
        if self.variant.family != "medcoss":
            raise TrainingConfigError(
                f"variant {settings.variant!r} is not a MedCoSS variant (e.g. medcoss-vitb, medcoss-tiny)"
            )
        config = self.variant.build_config()
        self.tokenizer = None
        self.data: dict[str, ModalityData] = {}
        for modality in settings.stages:
            self.data[modality] = ModalityData(modality, self._load(modality, config), self)
        self.buffers: dict[str, list[int]] = {}
        self.network = MedCossNetwork(MedCossForPreTraining(config))

    def _load(self, modality: str, config) -> ManifestDataset | ConcatDataset | TextData:
        if modality != "text":
            processor = modality_processor(modality, config)
            datasets = [
                ManifestDataset(read_split(m, "train", modality), processor)
                for m in self.manifests
                if any(r.split == "train" and r.modality == modality for r in load_manifest(m, check_files=False))
            ]
            if not datasets:
                raise TrainingConfigError(
                    f"stage {modality!r} has no data: no train row of {', '.join(m.name for m in self.manifests)} "
                    f"has modality {modality!r}"
                )
            return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
        texts = report_texts(self.manifests)
        if not texts:
            raise TrainingConfigError(
                "the text stage found no reports: no train row of "
                f"{', '.join(m.name for m in self.manifests)} has a `text` field"
            )
        s = self.settings
        if not s.tokenizer and s.tokenizer_vocab_size > config.vocab_size:
            raise TrainingConfigError(
                f"tokenizer_vocab_size {s.tokenizer_vocab_size} is more than the model's vocab_size {config.vocab_size}"
            )
        self.tokenizer = load_tokenizer(s.tokenizer) if s.tokenizer else train_wordpiece(texts, s.tokenizer_vocab_size)
        if len(self.tokenizer) > config.vocab_size:
            raise TrainingConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}"
            )
        return TextData(texts, encode(self.tokenizer, texts, s.text_length))

    def stages(self) -> list[Stage]:
        return [ModalityStage(index, self) for index in range(len(self.settings.stages))]

    def _provenance(self) -> Provenance:
        s = self.settings
        sizes = ", ".join(f"{m}: {len(self.data[m])}" for m in s.stages)
        buffers = ", ".join(f"{m}: {len(v)}" for m, v in self.buffers.items()) or "none"
        rehearsal = (
            f"k-means rehearsal buffers ({s.rehearsal.buffer_ratio:g} of each stage, {s.rehearsal.center_ratio:g} "
            f"centres; sizes {buffers}), feature distillation{' after intra-modal mixup' if s.rehearsal.mixup else ''}"
            if s.rehearsal.enabled
            else "no rehearsal (plain sequential pretraining: no buffer, distillation or mixup)"
        )
        description = (
            f"trained with medhub's MedCoSS recipe: stages {' -> '.join(s.stages)}, {s.steps_per_stage} steps each, "
            f"{rehearsal}"
        )
        data = f"train samples per stage ({sizes}) from {', '.join(m.name for m in self.manifests)}"
        return self.trained_provenance(description, data, stages=",".join(s.stages))

    def export(self, out_dir: Path) -> list[Path]:
        model = self.network.model
        model.cpu()
        repo = export_variant(model, out_dir / "medcoss", self.variant, self._provenance(), overwrite=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(repo)
            write_checksums(repo)
        model.to(self.dist.device)
        return [repo]
