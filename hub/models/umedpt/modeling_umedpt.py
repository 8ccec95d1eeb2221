"""UMedPT models: a Swin V2 encoder with the 1x1 squeezer, and the classification, U-Net segmentation and FCOS
detection heads of its multi-task pre-training.

Paper: "Overcoming data scarcity in biomedical imaging with a foundational multi-task model" (Schäfer et al.,
Nat. Comput. Sci. 2024). The encoder keeps torchvision's `swin_v2_t` module names (`features.*`, `norm.*`) and is
built from torchvision's Swin V2 blocks; stage maps are taken without the final `norm` (as upstream, which keeps
`norm` only in its state dict, so this model keeps it for strict loading). Shared blocks use GroupNorm(1, C) where
the authors' framework replaced BatchNorm. This file only imports torch, torchvision and transformers, so it also
runs as remote code from an exported repo.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.swin_transformer import PatchMergingV2, ShiftedWindowAttentionV2, SwinTransformerBlockV2
from torchvision.ops import FeaturePyramidNetwork, batched_nms, clip_boxes_to_image, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Permute
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_umedpt import UmedptConfig


class UmedptWindowAttention(ShiftedWindowAttentionV2):
    """torchvision's Swin V2 window attention, with the relative-position table cast to the weights' dtype (it is a
    float32 buffer, so a bfloat16 model would otherwise fail) and, on request, its attention probabilities."""

    def get_relative_position_bias(self) -> torch.Tensor:
        table = self.relative_coords_table.to(self.cpb_mlp[0].weight.dtype)
        bias = self.cpb_mlp(table).view(-1, self.num_heads)[self.relative_position_index]
        area = self.window_size[0] * self.window_size[1]
        return 16 * torch.sigmoid(bias.view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0))

    def attention_probabilities(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The softmax of the shifted-window attention that `forward` applies, (batch * windows, heads, window
        area, window area); windows in raster order of the (shifted, padded) grid."""
        window = self.window_size
        batch, height, width, channels = hidden_states.shape
        padded = F.pad(hidden_states, (0, 0, 0, (-width) % window[1], 0, (-height) % window[0]))
        _, pad_h, pad_w, _ = padded.shape
        shift = [0 if window[0] >= pad_h else self.shift_size[0], 0 if window[1] >= pad_w else self.shift_size[1]]
        if sum(shift):
            padded = torch.roll(padded, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        rows, cols = pad_h // window[0], pad_w // window[1]
        tokens = padded.view(batch, rows, window[0], cols, window[1], channels).permute(0, 1, 3, 2, 4, 5)
        tokens = tokens.reshape(batch * rows * cols, window[0] * window[1], channels)
        qkv_bias = self.qkv.bias.clone()
        qkv_bias[channels : 2 * channels] = 0
        qkv = F.linear(tokens, self.qkv.weight, qkv_bias).view(tokens.shape[0], tokens.shape[1], 3, self.num_heads, -1)
        query, key = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        scores = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(self.logit_scale, max=math.log(100.0)).exp() + self.get_relative_position_bias()
        if sum(shift):
            regions = hidden_states.new_zeros((pad_h, pad_w))
            count = 0
            for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
                for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
                    regions[h[0] : h[1], w[0] : w[1]] = count
                    count += 1
            regions = regions.view(rows, window[0], cols, window[1]).permute(0, 2, 1, 3).reshape(rows * cols, -1)
            mask = (regions[:, None, :] != regions[:, :, None]).to(scores.dtype) * -100.0
            scores = scores.view(batch, rows * cols, self.num_heads, *scores.shape[2:]) + mask[None, :, None]
            scores = scores.view(-1, self.num_heads, *scores.shape[3:])
        return scores.softmax(dim=-1)


class UmedptSwinBlock(GradientCheckpointingLayer, SwinTransformerBlockV2):
    """torchvision's Swin V2 block (same parameter names), checkpointable, optionally returning its attention."""

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, ...]:
        probabilities = self.attn.attention_probabilities(hidden_states) if output_attentions else None
        hidden_states = SwinTransformerBlockV2.forward(self, hidden_states)
        return (hidden_states, probabilities) if output_attentions else (hidden_states,)


def _swin_features(config: UmedptConfig) -> nn.Sequential:
    """torchvision's `SwinTransformer.features` for Swin V2: stem, then stages with patch merging between them."""
    norm_layer = partial(nn.LayerNorm, eps=config.layer_norm_eps)
    window = [config.window_size] * 2
    layers: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(config.num_channels, config.embed_dim, config.patch_size, stride=config.patch_size),
            Permute([0, 2, 3, 1]),
            norm_layer(config.embed_dim),
        )
    ]
    total, block_id = sum(config.depths), 0
    for index, (depth, heads, width) in enumerate(zip(config.depths, config.num_heads, config.stage_channels)):
        blocks = []
        for position in range(depth):
            blocks.append(
                UmedptSwinBlock(
                    width,
                    heads,
                    window_size=window,
                    shift_size=[0 if position % 2 == 0 else w // 2 for w in window],
                    mlp_ratio=config.mlp_ratio,
                    dropout=config.dropout,
                    attention_dropout=config.attention_dropout,
                    stochastic_depth_prob=config.stochastic_depth_prob * block_id / max(total - 1, 1),
                    norm_layer=norm_layer,
                    attn_layer=UmedptWindowAttention,
                )
            )
            block_id += 1
        layers.append(nn.Sequential(*blocks))
        if index < len(config.depths) - 1:
            layers.append(PatchMergingV2(width, norm_layer))
    return nn.Sequential(*layers)


class UmedptSqueezer(nn.Module):
    """1x1 conv, GroupNorm(1, C), GELU: gives the latent map (dense tasks) and the pooled hidden vector."""

    def __init__(self, config: UmedptConfig):
        super().__init__()
        in_channels = config.stage_channels[-1]
        self.conv = (
            nn.Conv2d(in_channels, config.squeezer_channels, 1, bias=config.squeezer_bias)
            if config.squeezer_channels
            else None
        )
        self.norm = nn.GroupNorm(1, config.hidden_size)
        self.activation = nn.GELU()

    def _squeeze(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return self.activation(self.norm(hidden_states))

    def forward(self, last_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._squeeze(last_map), self._squeeze(last_map.mean(dim=(2, 3), keepdim=True)).flatten(1)


# Copied from hub.models.muscle.modeling_muscle.MuscleAnchorGenerator with Muscle->Umedpt
class UmedptAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with its cell anchors held as (non-persistent) buffers, so that they follow
    `.to()` and are re-created by `_init_weights` after an initialisation on the meta device."""

    @property
    def cell_anchors(self) -> list[torch.Tensor]:
        return [getattr(self, f"cell_anchors_{index}") for index in range(len(self.sizes))]

    @cell_anchors.setter
    def cell_anchors(self, anchors: list[torch.Tensor]) -> None:
        for index, cell in enumerate(anchors):
            self.register_buffer(f"cell_anchors_{index}", cell, persistent=False)

    def reset_cell_anchors(self) -> None:
        with torch.device("cpu"):
            for index, (sizes, ratios) in enumerate(zip(self.sizes, self.aspect_ratios)):
                init.copy_(getattr(self, f"cell_anchors_{index}"), self.generate_anchors(sizes, ratios))


def _relative_position_tables(window_size: list[int]) -> nn.Module:
    """torchvision's Swin V2 relative-position buffers for `window_size`, built on the CPU (a model initialised on
    the meta device gets them from here)."""
    holder = nn.Module()
    holder.window_size = window_size
    with torch.device("cpu"):
        ShiftedWindowAttentionV2.define_relative_position_bias_table(holder)
        ShiftedWindowAttentionV2.define_relative_position_index(holder)
    return holder


class UmedptPreTrainedModel(PreTrainedModel):
    config: UmedptConfig
    config_class = UmedptConfig
    base_model_prefix = "umedpt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["UmedptSwinBlock", "PatchMergingV2"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """torchvision's Swin init (truncated-normal Linear), He-normal convs, unit norms; FCOS's prior bias."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ShiftedWindowAttentionV2):
            init.constant_(module.logit_scale, math.log(10))
            fresh = _relative_position_tables(module.window_size)
            init.copy_(module.relative_coords_table, fresh.relative_coords_table)
            init.copy_(module.relative_position_index, fresh.relative_position_index)
        elif isinstance(module, UmedptAnchorGenerator):
            module.reset_cell_anchors()
        elif isinstance(module, UmedptFCOSHead):
            init.ones_(module.scales)
            init.normal_(module.cls_logits.weight, std=0.01)
            init.constant_(module.cls_logits.bias, -math.log((1 - 0.01) / 0.01))


class UmedptModel(UmedptPreTrainedModel):
    """The frozen-encoder view: the squeezed last map, the pooled hidden vector (`pooler_output`), stage maps."""

    def __init__(self, config: UmedptConfig):
        super().__init__(config)
        self.features = _swin_features(config)
        self.norm = nn.LayerNorm(config.stage_channels[-1], eps=config.layer_norm_eps)
        self.squeezer = UmedptSqueezer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (conv, permute, LayerNorm)."""
        return self.features[0]

    def stage_maps(
        self, pixel_values: torch.Tensor, attentions: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The stem (patch embedding) and the four Swin stage outputs as (batch, C, H/s, W/s) maps, s = 4, 4, 8,
        16, 32, in `config.stage_names` order, without the final norm. When `attentions` is a list, every block's
        attention probabilities are appended to it."""
        config = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {config.num_channels}, "
                f"height, width), got {tuple(pixel_values.shape)}"
            )
        if any(side % config.input_multiple for side in pixel_values.shape[2:]):
            raise ValueError(
                f"pixel_values height and width must be multiples of {config.input_multiple} (Swin patch and window "
                f"grid), got {tuple(pixel_values.shape[2:])}"
            )
        hidden_states = self.features[0](pixel_values)
        maps = [hidden_states.permute(0, 3, 1, 2)]
        for index, layer in enumerate(self.features[1:], start=1):
            if index % 2 == 0:
                hidden_states = layer(hidden_states)
                continue
            for block in layer:
                hidden_states, *probabilities = block(hidden_states, output_attentions=attentions is not None)
                if attentions is not None:
                    attentions.extend(probabilities)
            maps.append(hidden_states.permute(0, 3, 1, 2))
        return maps

    def encode(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """`stage_maps`, with an output's `hidden_states` (the same maps) and `attentions` (every block's), each
        None unless `output_hidden_states` / `output_attentions` (default: the config's) ask for it."""
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        attentions = [] if output_attentions else None
        maps = self.stage_maps(pixel_values, attentions)
        hidden_states = tuple(maps) if output_hidden_states else None
        return maps, hidden_states, tuple(attentions) if output_attentions else None

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        maps, hidden_states, attentions = self.encode(pixel_values, output_hidden_states, output_attentions)
        latent, pooled = self.squeezer(maps[-1])
        return BaseModelOutputWithPooling(
            last_hidden_state=latent, pooler_output=pooled, hidden_states=hidden_states, attentions=attentions
        )


def _inverse_log_classes(num_classes: int) -> float:
    """UMedPT divides task losses by ln C so that tasks with different class counts weigh alike (1 for C < 2)."""
    return 1.0 / math.log(num_classes) if num_classes > 1 else 1.0


class UmedptForImageClassification(UmedptPreTrainedModel):
    """Dropout, ReLU, Linear on the pooled hidden vector; cross-entropy / ln C (BCE / ln 2 for multi-label)."""

    def __init__(self, config: UmedptConfig):
        super().__init__(config)
        self.umedpt = UmedptModel(config)
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout), nn.ReLU(), nn.Linear(config.hidden_size, config.num_labels)
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.umedpt(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None if labels is None else log_scaled_classification_loss(self.config, logits, labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# Copied from hub.models.muscle.modeling_muscle.problem_type_of with MuscleConfig->UmedptConfig
def problem_type_of(config: UmedptConfig, labels: torch.Tensor) -> str:
    """`config.problem_type`, or, when unset, inferred from the labels as transformers' classification heads do."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


# Copied from hub.models.muscle.modeling_muscle.classification_loss with MuscleConfig->UmedptConfig
def classification_loss(config: UmedptConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, BCE or MSE by `config.problem_type`, inferred from the labels when unset."""
    problem_type = problem_type_of(config, labels)
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def log_scaled_classification_loss(config: UmedptConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """UMedPT's task weighting of `classification_loss`: cross-entropy / ln C, BCE / ln 2, MSE as it is."""
    loss = classification_loss(config, logits, labels)
    problem_type = problem_type_of(config, labels)
    if problem_type == "regression":
        return loss
    if problem_type == "single_label_classification":
        return loss * _inverse_log_classes(config.num_labels)
    return loss / math.log(2)


def _conv_norm_act(in_channels: int, out_channels: int, activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(1, out_channels), activation()
    )


class UmedptDecoderBlock(nn.Module):
    """Nearest x2 upsampling, concatenation with the skip, two conv3x3-GroupNorm(1, C)-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = _conv_norm_act(in_channels + skip_channels, out_channels, nn.ReLU)
        self.conv2 = _conv_norm_act(out_channels, out_channels, nn.ReLU)

    def forward(self, hidden_states: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        if skip is not None:
            hidden_states = torch.cat([hidden_states, skip], dim=1)
        return self.conv2(self.conv1(hidden_states))


class UmedptPixelDecoder(nn.Module):
    """The shared U-Net decoder: squeezed map at stride 32 up to stride 2 with skips at 16, 8 and 4, then a
    conv3x3-GroupNorm-GELU pixel embedding."""

    def __init__(self, config: UmedptConfig):
        super().__init__()
        widths = config.decoder_channels
        in_channels = [config.hidden_size] + widths[:-1]
        skip_channels = config.stage_channels[-2::-1] + [0]
        self.blocks = nn.ModuleList(
            UmedptDecoderBlock(cin, skip, cout) for cin, skip, cout in zip(in_channels, skip_channels, widths)
        )
        self.final_conv = nn.Sequential(
            nn.Conv2d(widths[-1], widths[-1], 3, padding=1), nn.GroupNorm(1, widths[-1]), nn.GELU()
        )

    def forward(self, maps: list[torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        skips = maps[-2::-1] + [None]
        hidden_states = latent
        for block, skip in zip(self.blocks, skips):
            hidden_states = block(hidden_states, skip)
        return self.final_conv(hidden_states)


class UmedptForSemanticSegmentation(UmedptPreTrainedModel):
    """Encoder, squeezer, U-Net decoder and a conv3x3 task head at half resolution.

    The loss is Dice + focal / ln C against labels nearest-downsampled to the logits (as upstream); the returned
    `logits` are upsampled bilinearly to the input size.
    """

    def __init__(self, config: UmedptConfig):
        super().__init__(config)
        self.umedpt = UmedptModel(config)
        self.decoder = UmedptPixelDecoder(config)
        self.dropout = nn.Dropout2d(config.segmentation_dropout)
        self.head = nn.Conv2d(config.decoder_channels[-1], config.num_labels, 3, padding=1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput:
        """`labels`: (batch, H, W) class indices, `semantic_loss_ignore_index` where unknown."""
        maps, hidden_states, attentions = self.umedpt.encode(pixel_values, output_hidden_states, output_attentions)
        latent, _ = self.umedpt.squeezer(maps[-1])
        half = self.head(self.dropout(self.decoder(maps[1:], latent)))
        loss = None
        if labels is not None:
            if labels.shape != (pixel_values.shape[0],) + pixel_values.shape[2:]:
                raise ValueError(
                    f"labels must have shape (batch, height, width) of the input, got {tuple(labels.shape)}"
                )
            small = F.interpolate(labels[:, None].float(), size=half.shape[2:], mode="nearest")[:, 0].long()
            loss = dice_focal_loss(self.config, half, small)
        logits = F.interpolate(half, size=pixel_values.shape[2:], mode="bilinear", align_corners=False)
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)


def dice_focal_loss(config: UmedptConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multiclass soft Dice (classes absent from the batch skipped) + per-class sigmoid focal loss / ln C."""
    num_classes = logits.shape[1]
    valid = labels != config.semantic_loss_ignore_index
    one_hot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).to(logits.dtype)
    one_hot = one_hot * valid[:, None]
    probabilities = logits.softmax(dim=1) * valid[:, None]
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    cardinality = (probabilities + one_hot).sum(dims)
    dice = 1 - 2 * intersection / cardinality.clamp_min(1e-7)
    present = one_hot.sum(dims) > 0
    dice_loss = (dice * present).mean()
    focal = sigmoid_focal_loss(
        logits.permute(0, 2, 3, 1)[valid],
        one_hot.permute(0, 2, 3, 1)[valid],
        alpha=-1,
        gamma=config.focal_gamma,
        reduction="sum",
    ) / valid.sum().clamp_min(1)
    return dice_loss + focal * _inverse_log_classes(num_classes)


class UmedptFCOSHead(nn.Module):
    """Shared classification and regression towers (3x3 conv, GroupNorm(32), GELU) over every pyramid level, then
    FCOS predictors: class logits, distances to the box sides (scaled per level, ReLU, in stride units) and
    centerness on the regression branch."""

    def __init__(self, config: UmedptConfig, num_levels: int):
        super().__init__()
        width = config.fpn_channels

        def tower() -> nn.Sequential:
            layers = []
            for _ in range(config.detection_num_convs):
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(32, width), nn.GELU()]
            return nn.Sequential(*layers)

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(width, config.num_labels, 3, padding=1)
        self.bbox_reg = nn.Conv2d(width, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        self.config = config

    @staticmethod
    def _flatten(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.permute(0, 2, 3, 1).flatten(1, 2)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, boxes, centerness = [], [], []
        for level, feature in enumerate(features):
            cls_features, reg_features = self.cls_tower(feature), self.reg_tower(feature)
            logits.append(self._flatten(self.cls_logits(cls_features)))
            boxes.append(self._flatten(F.relu(self.bbox_reg(reg_features) * self.scales[level])))
            centerness.append(self._flatten(self.ctrness(reg_features)))
        return {
            "cls_logits": torch.cat(logits, 1),
            "bbox_regression": torch.cat(boxes, 1),
            "bbox_ctrness": torch.cat(centerness, 1),
        }

    def compute_loss(
        self,
        targets: list[dict[str, torch.Tensor]],
        head_outputs: dict[str, torch.Tensor],
        anchors: list[torch.Tensor],
        matched_idxs: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Focal / ln C over all points, -log IoU weighted by the centerness targets, centerness BCE x 0.2."""
        config = self.config
        classes, boxes = [], []
        for target, matched in zip(targets, matched_idxs):
            index = matched.clip(min=0)
            if target["labels"].numel():
                classes.append(torch.where(matched >= 0, target["labels"][index], -1))
                boxes.append(target["boxes"][index])
            else:
                classes.append(torch.full_like(matched, -1))
                boxes.append(torch.zeros(len(matched), 4, device=matched.device))
        classes, boxes, anchors = torch.stack(classes), torch.stack(boxes), torch.stack(anchors)
        foreground = classes >= 0
        num_foreground = max(1, int(foreground.sum()))
        logits = head_outputs["cls_logits"]
        class_targets = torch.zeros_like(logits)
        class_targets[foreground, classes[foreground]] = 1.0
        loss_cls = (
            sigmoid_focal_loss(
                logits, class_targets, alpha=config.detection_focal_alpha, gamma=config.focal_gamma, reduction="sum"
            )
            / num_foreground
            * _inverse_log_classes(config.num_labels)
        )
        predicted = decode_side_distances(head_outputs["bbox_regression"][foreground], anchors[foreground])
        distances = encode_side_distances(anchors[foreground], boxes[foreground])
        left_right, top_bottom = distances[:, [0, 2]], distances[:, [1, 3]]
        centerness = torch.sqrt(
            (left_right.min(-1).values / left_right.max(-1).values)
            * (top_bottom.min(-1).values / top_bottom.max(-1).values)
        )
        iou = _paired_iou(predicted, boxes[foreground])
        loss_iou = (-(iou.clamp_min(1e-6).log()) * centerness).sum() / centerness.sum().clamp_min(1e-6)
        loss_ctr = (
            F.binary_cross_entropy_with_logits(
                head_outputs["bbox_ctrness"][foreground][:, 0], centerness, reduction="sum"
            )
            / num_foreground
        )
        return {
            "classification": loss_cls,
            "bbox_regression": loss_iou * config.detection_iou_weight,
            "bbox_ctrness": loss_ctr * config.detection_centerness_weight,
        }


def encode_side_distances(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS's regression targets: the distances (left, top, right, bottom) from each anchor's centre to the sides
    of its box, in units of the anchor's width and height."""
    centre_x, centre_y = (anchors[..., 0] + anchors[..., 2]) / 2, (anchors[..., 1] + anchors[..., 3]) / 2
    width, height = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    return torch.stack(
        (
            (centre_x - boxes[..., 0]) / width,
            (centre_y - boxes[..., 1]) / height,
            (boxes[..., 2] - centre_x) / width,
            (boxes[..., 3] - centre_y) / height,
        ),
        dim=-1,
    )


def decode_side_distances(distances: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The xyxy boxes that `encode_side_distances` describes."""
    anchors = anchors.to(distances.dtype)
    centre_x, centre_y = (anchors[..., 0] + anchors[..., 2]) / 2, (anchors[..., 1] + anchors[..., 3]) / 2
    width, height = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    return torch.stack(
        (
            centre_x - distances[..., 0] * width,
            centre_y - distances[..., 1] * height,
            centre_x + distances[..., 2] * width,
            centre_y + distances[..., 3] * height,
        ),
        dim=-1,
    )


def match_points(
    anchors: torch.Tensor, boxes: torch.Tensor, per_level: list[int], center_sampling_radius: float
) -> torch.Tensor:
    """FCOS's assignment of points (one stride-sized anchor per location) to ground-truth boxes: the index of the
    box each point regresses, -1 for background. A point is a candidate for a box when it lies inside the box,
    within `center_sampling_radius` strides of its centre, and its largest side distance is in its level's range
    (4 to 8 strides; the first level from 0, the last without bound); among candidates the smallest box wins."""
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    strides = anchors[:, 2] - anchors[:, 0]
    candidate = (points[:, None] - box_centres[None]).abs().amax(dim=2) < center_sampling_radius * strides[:, None]
    sides = torch.cat((points[:, None] - boxes[None, :, :2], boxes[None, :, 2:] - points[:, None]), dim=2)
    candidate &= sides.amin(dim=2) > 0
    lower, upper = strides * 4, strides * 8
    lower[: per_level[0]] = 0
    upper[-per_level[-1] :] = float("inf")
    reach = sides.amax(dim=2)
    candidate &= (reach > lower[:, None]) & (reach < upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    preference = candidate.to(torch.float32) * (1e8 - areas[None])
    best, matched = preference.max(dim=1)
    matched[best < 1e-5] = -1
    return matched


def _paired_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU of row-aligned xyxy boxes."""
    top_left = torch.maximum(first[:, :2], second[:, :2])
    bottom_right = torch.minimum(first[:, 2:], second[:, 2:])
    intersection = (bottom_right - top_left).clamp_min(0).prod(-1)
    areas = [(boxes[:, 2:] - boxes[:, :2]).clamp_min(0).prod(-1) for boxes in (first, second)]
    return intersection / (areas[0] + areas[1] - intersection).clamp_min(1e-6)


# Copied from hub.models.muscle.modeling_muscle.MuscleObjectDetectionOutput with Muscle->Umedpt
@dataclass
class UmedptObjectDetectionOutput(ModelOutput):
    """
    loss: the sum of `loss_dict` (when the model computes losses; see its docstring).
    loss_dict: the detector's losses by name.
    detections: eval mode only, one dict per image (a list, not a tensor: the counts differ per image):
        `boxes` (N, 4) xyxy in input pixels, `scores` (N,), `labels` (N,) in `id2label` ids.
    hidden_states: the encoder's stem and stage maps of the batch it ran on (after any resizing), when asked for.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    detections: list[dict[str, torch.Tensor]] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class UmedptForObjectDetection(UmedptPreTrainedModel):
    """FCOS on an FPN (P3-P7, strides 8-128) over stages 2-3 and the squeezed last map.

    Points are anchors of one stride-sized box per location, assigned to boxes by `match_points` (FCOS's centre
    sampling and scale ranges); detections keep, per level, the `detection_topk` points whose
    sqrt(class probability x centerness) passes `detection_score_threshold`, then class-wise NMS. `labels`: one
    dict per image with `class_labels` (N,) in `0..num_labels-1` and `boxes` (N, 4) as absolute xyxy pixels.
    Losses are computed whenever `labels` are given, in either mode (`loss_dict`: `classification`,
    `bbox_regression`, `bbox_ctrness`).
    """

    def __init__(self, config: UmedptConfig):
        super().__init__(config)
        self.umedpt = UmedptModel(config)
        channels = config.fpn_channels
        in_channels = config.stage_channels[1:3] + [config.hidden_size]
        self.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=LastLevelP6P7(channels, channels))
        strides = (8, 16, 32, 64, 128)
        self.head = UmedptFCOSHead(config, len(strides))
        self.anchor_generator = UmedptAnchorGenerator(tuple((stride,) for stride in strides), ((1.0,),) * len(strides))
        self.center_sampling_radius = 1.5 if config.detection_center_sampling else float("inf")
        self.post_init()

    def _detections(
        self, outputs: dict[str, torch.Tensor], points: torch.Tensor, per_level: list[int], image_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """One image's detections from its head outputs (points x ...) and points."""
        config = self.config
        boxes, scores, labels = [], [], []
        for logits, regression, centerness, level_points in zip(
            outputs["cls_logits"].split(per_level),
            outputs["bbox_regression"].split(per_level),
            outputs["bbox_ctrness"].split(per_level),
            points.split(per_level),
        ):
            level_scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(centerness)).flatten()
            kept = torch.where(level_scores > config.detection_score_threshold)[0]
            level_scores, order = level_scores[kept].topk(min(config.detection_topk, kept.numel()))
            kept = kept[order]
            point_index = torch.div(kept, logits.shape[-1], rounding_mode="floor")
            decoded = decode_side_distances(regression[point_index], level_points[point_index])
            boxes.append(clip_boxes_to_image(decoded, image_size))
            scores.append(level_scores)
            labels.append(kept % logits.shape[-1])
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(boxes, scores, labels, config.detection_nms_threshold)[: config.detections_per_image]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> UmedptObjectDetectionOutput:
        maps, hidden_states, _ = self.umedpt.encode(pixel_values, output_hidden_states, output_attentions=False)
        latent, _ = self.umedpt.squeezer(maps[-1])
        pyramid = self.fpn(OrderedDict(zip(("p3", "p4", "p5"), [maps[2], maps[3], latent])))
        features = list(pyramid.values())
        head_outputs = self.head(features)
        images = ImageList(pixel_values, [tuple(pixel_values.shape[2:])] * pixel_values.shape[0])
        anchors = self.anchor_generator(images, features)
        per_level = [feature.shape[2] * feature.shape[3] for feature in features]
        loss, loss_dict, detections = None, None, None
        if labels is not None:
            if len(labels) != pixel_values.shape[0]:
                raise ValueError(f"labels must hold one dict per image ({pixel_values.shape[0]}), got {len(labels)}")
            targets = [{"boxes": t["boxes"].float(), "labels": t["class_labels"].long()} for t in labels]
            matched = [
                match_points(points, target["boxes"], per_level, self.center_sampling_radius)
                for points, target in zip(anchors, targets)
            ]
            loss_dict = self.head.compute_loss(targets, head_outputs, anchors, matched)
            loss = sum(loss_dict.values())
        if not self.training:
            detections = [
                self._detections(
                    {name: value[index] for name, value in head_outputs.items()},
                    anchors[index],
                    per_level,
                    images.image_sizes[index],
                )
                for index in range(pixel_values.shape[0])
            ]
        return UmedptObjectDetectionOutput(
            loss=loss, loss_dict=loss_dict, detections=detections, hidden_states=hidden_states
        )


class UmedptBackbone(BackboneMixin, UmedptModel):
    """The stem and Swin stage maps (strides 4-32, before the squeezer) for dense heads (`AutoBackbone`); encoder
    key names."""

    def __init__(self, config: UmedptConfig):
        super().__init__(config)
        self.num_features = [config.embed_dim] + config.stage_channels

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        maps, hidden_states, attentions = self.encode(pixel_values, output_hidden_states, output_attentions)
        by_name = dict(zip(self.stage_names, maps))
        feature_maps = tuple(by_name[name] for name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=attentions)


__all__ = [
    "UmedptBackbone",
    "UmedptForImageClassification",
    "UmedptForObjectDetection",
    "UmedptForSemanticSegmentation",
    "UmedptModel",
    "UmedptObjectDetectionOutput",
    "UmedptPreTrainedModel",
]
