"""MUSCLE models: a torchvision-layout ResNet encoder with classification, DeepLab-V3 and Faster R-CNN heads.

Paper: "MUSCLE: Multi-task Self-supervised Continual Learning to Pre-train Deep Models for X-ray Images of
Multiple Body Parts" (Liao, Xiong et al., MICCAI 2022, arXiv 2310.02000). No official weights were released;
medhub's MUSCLE weights come from its own training recipe.

The encoder keeps torchvision's parameter names (`conv1`, `bn1`, `layer1`..`layer4`), so torchvision and SSL
ResNet checkpoints load without renaming. This file only imports torch, torchvision and transformers, so it also
runs as remote code from an exported repo.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
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

from .configuration_muscle import MuscleConfig


class MuscleBasicBlock(GradientCheckpointingLayer):
    """Two 3x3 convolutions with an identity (or 1x1 projected) shortcut: ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shortcut = hidden_states if self.downsample is None else self.downsample(hidden_states)
        hidden_states = self.relu(self.bn1(self.conv1(hidden_states)))
        hidden_states = self.bn2(self.conv2(hidden_states))
        return self.relu(hidden_states + shortcut)


class MuscleBottleneck(GradientCheckpointingLayer):
    """1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand by 4: ResNet-50 and deeper."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shortcut = hidden_states if self.downsample is None else self.downsample(hidden_states)
        hidden_states = self.relu(self.bn1(self.conv1(hidden_states)))
        hidden_states = self.relu(self.bn2(self.conv2(hidden_states)))
        hidden_states = self.bn3(self.conv3(hidden_states))
        return self.relu(hidden_states + shortcut)


def _make_stage(
    config: MuscleConfig, in_channels: int, width: int, depth: int, stride: int, dilation: tuple[int, int]
) -> nn.Sequential:
    """One stage; `dilation` is (first block, other blocks), as torchvision dilates only after the first block."""
    block = MuscleBottleneck if config.block_type == "bottleneck" else MuscleBasicBlock
    out_channels = width * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    blocks = [block(in_channels, width, stride, dilation[0], downsample)]
    blocks += [block(out_channels, width, 1, dilation[1], None) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class MuscleAnchorGenerator(AnchorGenerator):
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


class MusclePreTrainedModel(PreTrainedModel):
    config: MuscleConfig
    config_class = MuscleConfig
    base_model_prefix = "muscle"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MuscleBasicBlock", "MuscleBottleneck"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MuscleAnchorGenerator):
            module.reset_cell_anchors()


class MuscleModel(MusclePreTrainedModel):
    """The frozen-encoder view: stage maps and a global-average-pooled embedding (`pooler_output`)."""

    def __init__(self, config: MuscleConfig):
        super().__init__(config)
        self.conv1 = nn.Conv2d(config.num_channels, config.stem_width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(config.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels, stride_so_far, dilation = config.stem_width, 4, 1
        for index, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
            stride, first_dilation = (1 if index == 0 else 2), dilation
            if stride_so_far * stride > config.output_stride:
                dilation, stride = dilation * stride, 1
            stride_so_far *= stride
            stage = _make_stage(config, in_channels, width, depth, stride, (first_dilation, dilation))
            self.add_module(f"layer{index + 1}", stage)
            in_channels = config.stage_channels[index + 1]
        self.post_init()

    def stage_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The stem output followed by the output of each stage, in `config.stage_names` order."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        hidden_states = self.maxpool(self.relu(self.bn1(self.conv1(pixel_values))))
        maps = [hidden_states]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            hidden_states = stage(hidden_states)
            maps.append(hidden_states)
        return maps

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


class MuscleForImageClassification(MusclePreTrainedModel):
    """A single FC layer on the pooled embedding, as in MUSCLE's classification tasks."""

    def __init__(self, config: MuscleConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.muscle = MuscleModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.muscle(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None if labels is None else classification_loss(self.config, logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def problem_type_of(config: MuscleConfig, labels: torch.Tensor) -> str:
    """`config.problem_type`, or, when unset, inferred from the labels as transformers' classification heads do."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(config: MuscleConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, BCE or MSE by `config.problem_type`, inferred from the labels when unset."""
    problem_type = problem_type_of(config, labels)
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class MuscleForSemanticSegmentation(MusclePreTrainedModel):
    """DeepLab-V3: ASPP on the last stage of the encoder run at `segmentation_output_stride` (dilated, same
    weights), logits upsampled bilinearly to the input size."""

    def __init__(self, config: MuscleConfig):
        super().__init__(config)
        encoder_config = copy.deepcopy(config)
        encoder_config.output_stride = config.segmentation_output_stride
        self.muscle = MuscleModel(encoder_config)
        self.decode_head = deeplab_head(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        outputs = self.muscle(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.decode_head(outputs.last_hidden_state)
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = None if labels is None else segmentation_loss(self.config, logits, labels)
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def deeplab_head(config: MuscleConfig) -> nn.Sequential:
    """torchvision's `DeepLabHead` (the same modules and parameter names) with `config.aspp_channels` channels in
    place of its fixed 256: ASPP at `config.atrous_rates`, 3x3 conv, BatchNorm, ReLU, 1x1 classifier."""
    width = config.aspp_channels
    return nn.Sequential(
        ASPP(config.hidden_size, list(config.atrous_rates), width),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, config.num_labels, 1),
    )


def segmentation_loss(config: MuscleConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
class MuscleObjectDetectionOutput(ModelOutput):
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


class MuscleForObjectDetection(MusclePreTrainedModel):
    """Faster R-CNN (torchvision's RPN and RoI heads) on an FPN over the encoder's four stages.

    `labels` follow transformers' detection convention: one dict per image with `class_labels` (N,) in
    `0..num_labels-1` and `boxes` (N, 4) as absolute xyxy pixels. Losses need `model.train()` (`loss_dict`: the
    four Faster R-CNN losses, RPN and box head); in eval mode the model returns detections, a list of per-image
    dicts (not a tensor); `return_dict=False` gives the output's tuple, `(loss, loss_dict)` in training and
    `(detections,)` in eval, then `hidden_states` when asked for.
    """

    def __init__(self, config: MuscleConfig):
        super().__init__(config)
        self.muscle = MuscleModel(config)
        channels = config.fpn_channels
        self.fpn = FeaturePyramidNetwork(config.stage_channels[1:], channels, extra_blocks=LastLevelMaxPool())
        self.transform = GeneralizedRCNNTransform(
            config.detection_min_size,
            config.detection_max_size,
            [0.0] * config.num_channels,
            [1.0] * config.num_channels,
        )
        ratios = tuple(config.rpn_aspect_ratios)
        anchors = MuscleAnchorGenerator(tuple((size,) for size in config.rpn_anchor_sizes), (ratios,) * 5)
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(channels, len(ratios)),
            fg_iou_thresh=config.rpn_fg_iou_threshold,
            bg_iou_thresh=config.rpn_bg_iou_threshold,
            batch_size_per_image=config.rpn_batch_size_per_image,
            positive_fraction=config.rpn_positive_fraction,
            pre_nms_top_n={"training": config.rpn_pre_nms_top_n_train, "testing": config.rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": config.rpn_post_nms_top_n_train, "testing": config.rpn_post_nms_top_n_test},
            nms_thresh=config.rpn_nms_threshold,
        )
        roi_size, box_width = config.box_roi_size, config.box_head_channels
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(["0", "1", "2", "3"], roi_size, config.box_sampling_ratio),
            TwoMLPHead(channels * roi_size**2, box_width),
            FastRCNNPredictor(box_width, config.num_labels + 1),
            fg_iou_thresh=config.box_fg_iou_threshold,
            bg_iou_thresh=config.box_bg_iou_threshold,
            batch_size_per_image=config.box_batch_size_per_image,
            positive_fraction=config.box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=config.box_score_threshold,
            nms_thresh=config.box_nms_threshold,
            detections_per_img=config.box_detections_per_image,
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MuscleObjectDetectionOutput:
        if labels is not None and not self.training:
            raise ValueError("MuscleForObjectDetection computes losses in training mode only; call model.train() first")
        if labels is None and self.training:
            raise ValueError(
                "MuscleForObjectDetection in training mode needs labels (boxes and class_labels per image)"
            )
        # torchvision reserves class 0 for the background.
        targets = (
            None
            if labels is None
            else [{"boxes": target["boxes"].float(), "labels": target["class_labels"].long() + 1} for target in labels]
        )
        original_sizes = [tuple(image.shape[-2:]) for image in pixel_values]
        images, targets = self.transform(list(pixel_values), targets)
        maps, hidden_states = self.muscle.encode(images.tensors, output_hidden_states)
        features = self.fpn(OrderedDict((str(index), fmap) for index, fmap in enumerate(maps[1:])))
        proposals, proposal_losses = self.rpn(images, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        loss_dict, loss = None, None
        if self.training:
            loss_dict = {**proposal_losses, **detector_losses}
            loss = sum(loss_dict.values())
            detections = None
        else:
            detections = self.transform.postprocess(detections, images.image_sizes, original_sizes)
            for detection in detections:
                detection["labels"] = detection["labels"] - 1
        return MuscleObjectDetectionOutput(
            loss=loss, loss_dict=loss_dict, detections=detections, hidden_states=hidden_states
        )


class MuscleBackbone(BackboneMixin, MuscleModel):
    """Stage maps for dense heads (`AutoBackbone`); parameter names are the encoder's, so encoder repos load."""

    has_attentions = False

    def __init__(self, config: MuscleConfig):
        super().__init__(config)
        self.num_features = config.stage_channels

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        maps, hidden_states = self.encode(pixel_values, output_hidden_states)
        by_name = dict(zip(self.stage_names, maps))
        feature_maps = tuple(by_name[name] for name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


__all__ = [
    "MuscleBackbone",
    "MuscleForImageClassification",
    "MuscleForObjectDetection",
    "MuscleForSemanticSegmentation",
    "MuscleModel",
    "MusclePreTrainedModel",
]
