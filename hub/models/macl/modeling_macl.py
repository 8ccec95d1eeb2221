"""MACL models: the authors' U-Net split into an encoder and a decoder, a 1x1 segmentation head and the
pre-training projectors with the three MACL losses.

Paper: "Multi-level Asymmetric Contrastive Learning for Medical Image Segmentation Pre-training"
(arXiv 2309.11876 v3, IEEE JBHI). Module names inside the encoder and decoder are the authors'
(`contr_1_1` ... `center`, `upscale5` ... `expand_1_2`, projectors `target_instance_projector`,
`online_instance_projector`, `target_pixel_projector`), so released checkpoints load after renaming
`share_encoder.` -> `encoder.` and `online_decoder.` -> `decoder.`. With `spatial_dims=3` every 2D operation is
replaced by its 3D twin (medhub's extension). This file only imports torch and transformers, so it also runs as
remote code from an exported repo.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, SemanticSegmenterOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_macl import MaclConfig

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


def _conv_block(config: MaclConfig, in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv 3x3 (with bias) -> BatchNorm -> LeakyReLU: the authors' `contract` and `expand` blocks."""
    dims = config.spatial_dims
    return nn.Sequential(
        _CONV[dims](in_channels, out_channels, 3, padding=1),
        _BATCH_NORM[dims](out_channels),
        nn.LeakyReLU(config.negative_slope, inplace=True),
    )


def check_pixel_values(
    config: MaclConfig, pixel_values: torch.Tensor, multiple: int, name: str = "pixel_values"
) -> None:
    """Raise ValueError unless `pixel_values` is (batch, num_channels, *spatial) with sides divisible by `multiple`."""
    dims = config.spatial_dims
    layout = ", ".join(["batch", str(config.num_channels)] + list("DHW"[3 - dims :]))
    if pixel_values.ndim != dims + 2 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(f"{name} must have shape ({layout}), got {tuple(pixel_values.shape)}")
    if any(side % multiple for side in pixel_values.shape[2:]):
        raise ValueError(f"{name} spatial sides must be multiples of {multiple}, got {tuple(pixel_values.shape[2:])}")


def _instance_projector(config: MaclConfig, in_channels: int) -> nn.Sequential:
    """Global average pool, Linear to 4F, ReLU, Linear to `projection_dim`: the authors' instance projectors."""
    width = config.stage_channels[2]
    return nn.Sequential(
        _AVG_POOL[config.spatial_dims](1),
        nn.Flatten(),
        nn.Linear(in_channels, width),
        nn.ReLU(inplace=True),
        nn.Linear(width, config.projection_dim),
    )


class MaclEncoder(nn.Module):
    """Four stages of two contract blocks with max-pooling between them, then the BN-free ReLU centre."""

    def __init__(self, config: MaclConfig):
        super().__init__()
        dims, channels = config.spatial_dims, config.stage_channels
        in_channels = config.num_channels
        for stage in range(1, 5):
            self.add_module(f"contr_{stage}_1", _conv_block(config, in_channels, channels[stage - 1]))
            self.add_module(f"contr_{stage}_2", _conv_block(config, channels[stage - 1], channels[stage - 1]))
            in_channels = channels[stage - 1]
        self.pool = _MAX_POOL[dims](2, stride=2)
        self.center = nn.Sequential(
            _CONV[dims](channels[3], channels[4], 3, padding=1),
            nn.ReLU(inplace=True),
            _CONV[dims](channels[4], channels[4], 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The four skip maps (full to 1/8 resolution) and the bottleneck (1/16)."""
        maps, hidden_states = [], pixel_values
        for stage in range(1, 5):
            hidden_states = getattr(self, f"contr_{stage}_2")(getattr(self, f"contr_{stage}_1")(hidden_states))
            maps.append(hidden_states)
            hidden_states = self.pool(hidden_states)
        maps.append(self.center(hidden_states))
        return maps


class MaclDecoder(nn.Module):
    """Four up-blocks: transposed conv x2, concatenation with the skip, two expand blocks."""

    def __init__(self, config: MaclConfig):
        super().__init__()
        dims, channels = config.spatial_dims, config.stage_channels
        for level in range(4, 0, -1):
            wide, narrow = channels[level], channels[level - 1]
            self.add_module(f"upscale{level + 1}", _CONV_TRANSPOSE[dims](wide, narrow, 2, stride=2))
            self.add_module(f"expand_{level}_1", _conv_block(config, wide, narrow))
            self.add_module(f"expand_{level}_2", _conv_block(config, narrow, narrow))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of the four up-blocks (1/8 to full resolution) from the encoder's skips and bottleneck."""
        outputs, hidden_states = [], maps[-1]
        for level in range(4, 0, -1):
            hidden_states = getattr(self, f"upscale{level + 1}")(hidden_states)
            hidden_states = torch.cat([hidden_states, maps[level - 1]], dim=1)
            hidden_states = getattr(self, f"expand_{level}_2")(getattr(self, f"expand_{level}_1")(hidden_states))
            outputs.append(hidden_states)
        return outputs


class MaclPreTrainedModel(PreTrainedModel):
    config: MaclConfig
    config_class = MaclConfig
    base_model_prefix = "macl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MaclEncoder", "MaclDecoder"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """He-normal (a = LeakyReLU slope) convolutions with zero bias, as upstream; PyTorch's default Linear init."""
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            init.kaiming_normal_(module.weight, a=self.config.negative_slope)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)


class MaclModel(MaclPreTrainedModel):
    """The frozen-encoder view: the 16F bottleneck, its global average (`pooler_output`) and the skip maps."""

    def __init__(self, config: MaclConfig):
        super().__init__(config)
        self.encoder = MaclEncoder(config)
        self.post_init()

    def stage_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Skip maps at 1, 1/2, 1/4, 1/8 resolution and the bottleneck at 1/16."""
        check_pixel_values(self.config, pixel_values, self.config.input_multiple)
        return self.encoder(pixel_values)

    # Copied from hub.models.muscle.modeling_muscle.MuscleModel.encode
    def encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        """`stage_maps`, and the same maps as an output's `hidden_states` when `output_hidden_states` (default: the
        config's) asks for them, else None."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        maps = self.stage_maps(pixel_values)
        return maps, tuple(maps) if output_hidden_states else None

    # Copied from hub.models.muscle.modeling_muscle.MuscleModel.forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        maps, hidden_states = self.encode(pixel_values, output_hidden_states)
        pooled = maps[-1].flatten(2).mean(dim=-1)
        return BaseModelOutputWithPooling(last_hidden_state=maps[-1], pooler_output=pooled, hidden_states=hidden_states)


class MaclForSemanticSegmentation(MaclPreTrainedModel):
    """The fine-tuning U-Net: encoder, all four decoder up-blocks and a 1x1 head at full resolution."""

    def __init__(self, config: MaclConfig):
        super().__init__(config)
        self.macl = MaclModel(config)
        self.decoder = MaclDecoder(config)
        self.head = _CONV[config.spatial_dims](
            config.base_filters, config.num_labels, 1, bias=config.segmentation_head_bias
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput:
        """`labels`: (batch, *spatial) class indices; the loss is pixel-wise cross-entropy (BCE for one label)."""
        maps, hidden_states = self.macl.encode(pixel_values, output_hidden_states)
        logits = self.head(self.decoder(maps)[-1])
        loss = None if labels is None else segmentation_loss(self.config, logits, labels)
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


# Copied from hub.models.muscle.modeling_muscle.segmentation_loss with MuscleConfig->MaclConfig
def segmentation_loss(config: MaclConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy over (batch, *spatial) class indices; BCE for a single foreground channel."""
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:1] + logits.shape[2:])}, got {tuple(labels.shape)}"
        )
    if config.num_labels == 1:
        valid = labels != config.semantic_loss_ignore_index
        return F.binary_cross_entropy_with_logits(logits[:, 0][valid], labels[valid].to(logits.dtype))
    return F.cross_entropy(logits, labels.long(), ignore_index=config.semantic_loss_ignore_index)


@dataclass
class MaclPreTrainingOutput(ModelOutput):
    """
    loss: weighted sum of the three losses (when `slice_positions` are given).
    loss_global / loss_dense / loss_equivariance: the image-level and pixel-level contrastive losses and the
        L1 equivariant regularisation between the down-sampled auxiliary bottleneck and the dominant one.
    auxiliary_bottleneck / dominant_bottleneck: encoder bottlenecks of the full-resolution and down-sampled
        photometric views.
    auxiliary_dense / dominant_dense: the pixel projector's output and the dominant branch's second decoder
        stage (no projector, as upstream), both (batch, 4F, *spatial / 16).
    auxiliary_global / dominant_global: the two global projections, (batch, projection_dim).
    hidden_states: the encoder's skip maps and bottleneck of `pixel_values` (the auxiliary view), when asked for.
    """

    loss: torch.Tensor | None = None
    loss_global: torch.Tensor | None = None
    loss_dense: torch.Tensor | None = None
    loss_equivariance: torch.Tensor | None = None
    auxiliary_bottleneck: torch.Tensor | None = None
    dominant_bottleneck: torch.Tensor | None = None
    auxiliary_dense: torch.Tensor | None = None
    dominant_dense: torch.Tensor | None = None
    auxiliary_global: torch.Tensor | None = None
    dominant_global: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MaclForPreTraining(MaclPreTrainedModel):
    """The asymmetric two-branch network of MACL with one shared encoder.

    Auxiliary branch (full resolution): encoder, then the pixel projector (dense) or the global projector.
    Dominant branch (views down-sampled by `dominant_scale` inside the model): encoder, decoder (all four stages
    run, as upstream, so BatchNorm statistics of stages 3-4 move; only stage 2 is used), then the decoder-side
    global projector for the global vector.
    """

    def __init__(self, config: MaclConfig):
        super().__init__(config)
        channels = config.stage_channels
        self.macl = MaclModel(config)
        self.decoder = MaclDecoder(config)
        self.target_instance_projector = _instance_projector(config, channels[4])
        self.online_instance_projector = _instance_projector(config, channels[2])
        self.target_pixel_projector = nn.Sequential(
            *_conv_block(config, channels[4], channels[2]), *_conv_block(config, channels[2], channels[2])
        )
        self.post_init()

    def _down(self, values: torch.Tensor) -> torch.Tensor:
        mode = _INTERPOLATION[self.config.spatial_dims]
        return F.interpolate(values, scale_factor=self.config.dominant_scale, mode=mode, align_corners=True)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        dominant_pixel_values: torch.Tensor,
        spatial_pixel_values: torch.Tensor,
        dominant_spatial_pixel_values: torch.Tensor,
        slice_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MaclPreTrainingOutput:
        """Views I1, I2 (photometric pair) and V1, V2 (spatially transformed pair) of the same slices, all at full
        resolution; `slice_positions` (batch,) in (0, 1] make positives and turn on the loss."""
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        multiple = round(self.config.input_multiple / self.config.dominant_scale)
        views = {
            "pixel_values": pixel_values,
            "dominant_pixel_values": dominant_pixel_values,
            "spatial_pixel_values": spatial_pixel_values,
            "dominant_spatial_pixel_values": dominant_spatial_pixel_values,
        }
        for name, values in views.items():
            check_pixel_values(self.config, values, multiple, name)
            if values.shape != pixel_values.shape:
                raise ValueError(
                    f"{name} has shape {tuple(values.shape)}, expected pixel_values' {tuple(pixel_values.shape)}"
                )
        encoder = self.macl.encoder
        auxiliary_maps = encoder(pixel_values)
        auxiliary_bottleneck = auxiliary_maps[-1]
        auxiliary_dense = self.target_pixel_projector(auxiliary_bottleneck)
        auxiliary_global = self.target_instance_projector(encoder(spatial_pixel_values)[-1])
        dominant_maps = encoder(self._down(dominant_pixel_values))
        dominant_dense = self.decoder(dominant_maps)[1]
        dominant_global = self.online_instance_projector(
            self.decoder(encoder(self._down(dominant_spatial_pixel_values)))[1]
        )
        output = MaclPreTrainingOutput(
            auxiliary_bottleneck=auxiliary_bottleneck,
            dominant_bottleneck=dominant_maps[-1],
            auxiliary_dense=auxiliary_dense,
            dominant_dense=dominant_dense,
            auxiliary_global=auxiliary_global,
            dominant_global=dominant_global,
            hidden_states=tuple(auxiliary_maps) if output_hidden_states else None,
        )
        if slice_positions is not None:
            self._add_losses(output, slice_positions)
        return output

    def _add_losses(self, output: MaclPreTrainingOutput, slice_positions: torch.Tensor) -> None:
        config = self.config
        if slice_positions.shape != output.auxiliary_global.shape[:1]:
            raise ValueError(
                f"slice_positions must have shape ({output.auxiliary_global.shape[0]},), "
                f"got {tuple(slice_positions.shape)}"
            )
        positives = (slice_positions[:, None] - slice_positions[None, :]).abs() < config.slice_threshold
        temperatures = (config.temperature, config.base_temperature)
        output.loss_global = supcon_loss(output.auxiliary_global, output.dominant_global, positives, *temperatures)
        # Every spatial location is its own contrastive problem over the batch.
        per_location = [value.flatten(2).permute(2, 0, 1) for value in (output.auxiliary_dense, output.dominant_dense)]
        output.loss_dense = supcon_loss(*per_location, positives, *temperatures)
        downsampled = self._down(output.auxiliary_bottleneck)
        output.loss_equivariance = F.l1_loss(downsampled, output.dominant_bottleneck)
        output.loss = (
            config.global_loss_weight * output.loss_global
            + config.dense_loss_weight * output.loss_dense
            + config.equivariance_loss_weight * output.loss_equivariance
        )


def supcon_loss(
    first: torch.Tensor, second: torch.Tensor, positives: torch.Tensor, temperature: float, base_temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss ("all" anchors) of two views (..., batch, dim) with a (batch, batch) positive mask.

    Cosine similarities over `temperature`; positives of an anchor are the other rows whose mask entry (tiled over
    both views) is set, which always includes its own other view; scaled by temperature / base_temperature.
    """
    features = F.normalize(torch.cat([first, second], dim=-2), dim=-1)
    logits = features @ features.transpose(-1, -2) / temperature
    count = logits.shape[-1]
    is_self = torch.eye(count, dtype=torch.bool, device=logits.device)
    positive = positives.repeat(2, 2) & ~is_self
    log_prob = torch.log_softmax(logits.masked_fill(is_self, float("-inf")), dim=-1)
    mean_positive = log_prob.masked_fill(~positive, 0.0).sum(-1) / positive.sum(-1)
    return -(temperature / base_temperature) * mean_positive.mean()


__all__ = [
    "MaclForPreTraining",
    "MaclForSemanticSegmentation",
    "MaclModel",
    "MaclPreTrainedModel",
    "MaclPreTrainingOutput",
]
