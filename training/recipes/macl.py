"""The MACL recipe: multi-level asymmetric contrastive pretraining of the U-Net on CT/MRI slices (or sub-volumes).

Every slice of the `--data` volumes (modality `ct` or `mri`, train split) yields four views (`training.slices`);
`MaclForPreTraining` computes the global and dense supervised-contrastive losses with positives |p_i - p_j| <
`slice_threshold` over the local batch (negatives are per rank, as upstream) and the L1 equivariance term. SGD
with a per-step cosine to 0. The export is the whole pretraining network (encoder, decoder, projectors), so
`AutoModel` gives the encoder and `AutoModelForSemanticSegmentation` the U-Net with a new 1x1 head.

The variant's `spatial_dims` chooses the data path. A 3D variant (`macl-unet3d`, `macl-unet3d-tiny`: medhub's
extension, e.g. `--preset tiny3d` / `paper3d` or `variant: macl-unet3d` in a config) trains on sub-volumes of
`crop` (D, H, W) voxels, one per start along the slice axis, each with the relative position of its centre
slice, so the positive rule is the 2D one; their views are the 2D ones with an in-plane blur, an in-plane
rotation with isotropic scale, and no elastic deformation. The dominant branch sees them down-sampled by 0.25
(trilinear) and its encoder needs sides that are multiples of 16, so every crop side is a multiple of 64; the
default crop is the variant's input size rounded up to that (64^3 for both 3D variants).

Where the released code and the paper differ the config chooses and the default is the code's:
learning rate 0.01 (paper 0.1), photometric views with jitter and blur (paper: identity), elastic deformation
(paper: none), the temperature / base_temperature factor 0.1 / 0.07 (paper: none; set base_temperature to 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from hub.export import Provenance, export_repo
from hub.models.macl import MaclForPreTraining
from training.config import EngineSettings, OptimSettings
from training.data import IndexStream, StepLoader, read_split, sample_generator
from training.distributed import DistInfo
from training.engine import ManifestRecipe, Stage
from training.errors import TrainingConfigError
from training.slices import ELASTIC_3D, SliceDataset, SubVolumeDataset, ViewSettings, macl_views, random_window

VOLUME_MODALITIES = ("ct", "mri")


# The recipe's values live in macl.yaml only: a field it sets has no default here (tests/test_training_config.py).
@dataclass(kw_only=True)
class LossSettings:
    """Written into the model config (`MaclConfig`), which computes the losses."""

    slice_threshold: float
    temperature: float
    base_temperature: float
    global_weight: float
    dense_weight: float
    equivariance_weight: float


@dataclass(kw_only=True)
class MaclSettings:
    variant: str
    modality: str
    crop: list[int] | None
    seed: int
    steps: int
    engine: EngineSettings = field(default_factory=EngineSettings)
    optim: OptimSettings
    views: ViewSettings
    loss: LossSettings


class MaclStage(Stage):
    def __init__(
        self,
        model: MaclForPreTraining,
        dataset: Dataset,
        settings: MaclSettings,
        dist: DistInfo,
        window: tuple[int, int] | None = None,
    ):
        self.name, self.num_steps, self.optim = "macl", settings.steps, settings.optim
        self.samples_per_step = settings.optim.batch_size * dist.world
        self.model, self.dataset, self.settings, self.device = model, dataset, settings, dist.device
        self.window = window
        self.stream = IndexStream([len(dataset)], settings.optim.batch_size, settings.seed, dist.rank, dist.world)
        self.loader = StepLoader(self.batch, settings.steps, settings.engine.num_workers)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The four view tensors (batch, C, H, W) or (batch, C, D, H, W) and the slice positions of `step`."""
        views: list[list[torch.Tensor]] = [[], [], [], []]
        positions = []
        for index, epoch in self.stream.batch(step):
            pixels, position = self.dataset[index]
            if self.window is not None:
                pixels = random_window(pixels, self.window, sample_generator(self.settings.seed, epoch, index, 4))
            generators = [sample_generator(self.settings.seed, epoch, index, view) for view in range(4)]
            for bucket, view in zip(views, macl_views(pixels, self.settings.views, generators)):
                bucket.append(view)
            positions.append(position)
        names = ("pixel_values", "dominant_pixel_values", "spatial_pixel_values", "dominant_spatial_pixel_values")
        batch = {name: torch.stack(bucket) for name, bucket in zip(names, views)}
        batch["slice_positions"] = torch.tensor(positions, dtype=torch.float32)
        return batch

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.model.train()
        batch = {name: value.to(self.device, non_blocking=True) for name, value in self.loader.get(step).items()}
        output = self.model(**batch)
        positives = (
            batch["slice_positions"][:, None] - batch["slice_positions"][None]
        ).abs() < self.model.config.slice_threshold
        metrics = {
            "loss_global": float(output.loss_global.detach()),
            "loss_dense": float(output.loss_dense.detach()),
            "loss_equivariance": float(output.loss_equivariance.detach()),
            "positives_per_slice": float(positives.sum(1).float().mean()),
        }
        return output.loss, metrics


class MaclRecipe(ManifestRecipe):
    name = "macl"

    def __init__(self, settings: MaclSettings, manifests: list[Path], dist: DistInfo):
        if manifests and settings.modality not in VOLUME_MODALITIES:
            raise TrainingConfigError(
                f"modality {settings.modality!r} is not a volume modality ({', '.join(VOLUME_MODALITIES)})"
            )
        super().__init__(settings, manifests, dist, "manifest of CT or MRI volumes")
        if self.variant.family != "macl":
            raise TrainingConfigError(
                f"variant {settings.variant!r} is not a MACL variant "
                "(macl-unet2d, macl-tiny, macl-unet3d, macl-unet3d-tiny)"
            )
        loss = settings.loss
        config = self.variant.build_config(
            slice_threshold=loss.slice_threshold,
            temperature=loss.temperature,
            base_temperature=loss.base_temperature,
            global_loss_weight=loss.global_weight,
            dense_loss_weight=loss.dense_weight,
            equivariance_loss_weight=loss.equivariance_weight,
        )
        self.processor = self.variant.build_processor()
        self.crop = self._crop(config.input_multiple, config.dominant_scale)
        rows = [read_split(m, "train", settings.modality) for m in self.manifests]
        if self.crop is None:
            datasets = [SliceDataset(r, self.processor) for r in rows]
        else:
            datasets = [SubVolumeDataset(r, self.processor, self.crop[0]) for r in rows]
        self.dataset = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
        if len(self.dataset) < 2:
            raise TrainingConfigError(
                f"contrastive pretraining needs at least 2 {self._samples}, got {len(self.dataset)}"
            )
        self.network = MaclForPreTraining(config)

    @property
    def _samples(self) -> str:
        return "slices" if self.crop is None else "sub-volumes"

    def _crop(self, input_multiple: int, dominant_scale: float) -> list[int] | None:
        """The sub-volume size of a 3D variant (None in 2D): `crop`, or the input size rounded up to the sides the
        dominant branch can take (its down-sampled input must be a multiple of the encoder's `input_multiple`)."""
        settings = self.settings
        multiple = round(input_multiple / dominant_scale)
        if self.variant.spatial_dims == 2:
            if settings.crop is not None:
                raise TrainingConfigError(f"crop applies to 3D variants only; {settings.variant!r} is 2D (remove crop)")
            return None
        if settings.views.elastic:
            raise TrainingConfigError(ELASTIC_3D)
        crop = settings.crop or [-(-side // multiple) * multiple for side in self.processor.size]
        if len(crop) != 3 or any(side < 1 or side % multiple for side in crop):
            raise TrainingConfigError(
                f"crop {crop} must be 3 sides (D, H, W), each a positive multiple of {multiple} (the dominant branch "
                f"sees the sub-volume down-sampled by {dominant_scale} and its encoder needs multiples of "
                f"{input_multiple})"
            )
        return crop

    def stages(self) -> list[Stage]:
        window = None if self.crop is None else (self.crop[1], self.crop[2])
        return [MaclStage(self.network, self.dataset, self.settings, self.dist, window)]

    def _provenance(self) -> Provenance:
        s = self.settings
        inputs = (
            "slices"
            if self.crop is None
            else (
                f"3D sub-volumes of {' x '.join(map(str, self.crop))} voxels (medhub's extension: in-plane blur and "
                f"rotation, isotropic scale)"
            )
        )
        description = (
            f"trained with medhub's MACL recipe on {inputs} for {s.steps} steps (batch {s.optim.batch_size} per "
            f"rank, {s.optim.optimizer} lr {s.optim.lr}, cosine to 0); views follow the "
            f"{'released code (jitter + blur' if s.views.photometric == 'code' else 'paper (identity photometric'}"
            f"{'' if s.views.photometric == 'code' else ' views'}"
            f"{', elastic' if s.views.elastic else ', no elastic'}); slice threshold {s.loss.slice_threshold}, "
            f"temperature {s.loss.temperature} / {s.loss.base_temperature}, loss weights "
            f"{s.loss.global_weight}/{s.loss.dense_weight}/{s.loss.equivariance_weight}"
        )
        data = f"{len(self.dataset)} {s.modality} {self._samples} from {', '.join(m.name for m in self.manifests)}"
        return self.trained_provenance(description, data)

    def export(self, out_dir: Path) -> list[Path]:
        with self.network_on_cpu():
            written = export_repo(
                self.network,
                out_dir / "macl",
                variant=self.variant.id,
                provenance=self._provenance(),
                processor=self.processor,
                modality=self.settings.modality,
                overwrite=True,
            )
        return [written]
