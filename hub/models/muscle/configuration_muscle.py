"""MUSCLE model configuration.

MUSCLE (Liao, Xiong et al., MICCAI 2022, arXiv 2310.02000) pretrains a torchvision-style ResNet-18/50 on many
X-ray datasets with momentum contrast, then continues on labelled tasks with an FC classifier, a DeepLab-V3
segmentation head and a Faster R-CNN detector. The paper body was not reachable, so the head settings below are
torchvision's defaults for those heads; they are config fields so that a run can record other choices.
"""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig


@strict
class MuscleConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a MUSCLE ResNet encoder and its task heads. Defaults describe `muscle-resnet50`.

    num_channels (`int`, defaults to 3): input channels (grey radiographs are repeated to 3 by the processor).
    stem_width (`int`, defaults to 64): channels of the 7x7 stem convolution.
    hidden_sizes (`list[int]`): base width of each stage; a stage outputs `width * expansion` channels.
    depths (`list[int]`): residual blocks per stage (ResNet-18: 2,2,2,2; ResNet-50: 3,4,6,3).
    block_type (`str`): `"basic"` (expansion 1) or `"bottleneck"` (expansion 4).
    output_stride (`int`): 32, 16 or 8; below 32 the last stages use dilation instead of stride.
    segmentation_output_stride (`int`): the encoder's output stride inside `MuscleForSemanticSegmentation`
        (default 8, as torchvision's DeepLab-V3); weights are the same, only strides become dilations.
    image_size (`int`): the square input side used for the golden example and export.
    pooling (`str`): how `pooler_output` is made from the last stage map; only `"mean"` (global average pool).
    aspp_channels / atrous_rates: the DeepLab-V3 head's width (its ASPP branches and the 3x3 conv after them) and
        atrous rates (torchvision's defaults: 256 channels, rates 12/24/36).
    fpn_channels / detection_min_size / detection_max_size: Faster R-CNN on an FPN over stages 1-4.
    rpn_*: the region proposal network (torchvision's `fasterrcnn_resnet50_fpn` defaults): one anchor size per
        FPN level (`rpn_anchor_sizes`) with `rpn_aspect_ratios`, IoU thresholds for foreground/background
        anchors, sampled anchors per image and their positive fraction, proposals kept before/after NMS in
        training and in eval, and the NMS IoU.
    box_*: the RoI heads: `box_roi_size` x `box_roi_size` RoIAlign (`box_sampling_ratio`), a two-layer MLP of
        `box_head_channels`, IoU thresholds, sampled RoIs per image and their positive fraction, and in eval the
        score threshold, NMS IoU and detections kept per image.
    classifier_dropout (`float`): dropout before the FC classifier.
    semantic_loss_ignore_index (`int`): label value ignored by the segmentation loss.

    Example:
    ```python
    >>> from hub.models.muscle import MuscleConfig, MuscleModel
    >>> model = MuscleModel(MuscleConfig(depths=[2, 2, 2, 2], block_type="basic"))  # ResNet-18 layout
    ```
    """

    model_type = "muscle"
    block_types: ClassVar[tuple[str, ...]] = ("basic", "bottleneck")
    poolings: ClassVar[tuple[str, ...]] = ("mean",)

    num_channels: int = 3
    stem_width: int = 64
    hidden_sizes: list[int] | tuple[int, ...] = (64, 128, 256, 512)
    depths: list[int] | tuple[int, ...] = (3, 4, 6, 3)
    block_type: str = "bottleneck"
    output_stride: int = 32
    segmentation_output_stride: int = 8
    image_size: int = 224
    pooling: str = "mean"
    aspp_channels: int = 256
    atrous_rates: list[int] | tuple[int, ...] = (12, 24, 36)
    fpn_channels: int = 256
    detection_min_size: int = 512
    detection_max_size: int = 1024
    rpn_anchor_sizes: list[int] | tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_aspect_ratios: list[float] | tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou_threshold: float = 0.7
    rpn_bg_iou_threshold: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_threshold: float = 0.7
    box_roi_size: int = 7
    box_sampling_ratio: int = 2
    box_head_channels: int = 1024
    box_fg_iou_threshold: float = 0.5
    box_bg_iou_threshold: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_threshold: float = 0.05
    box_nms_threshold: float = 0.5
    box_detections_per_image: int = 100
    classifier_dropout: float = 0.0
    semantic_loss_ignore_index: int = 255

    def __post_init__(self, **kwargs):
        self.hidden_sizes = list(self.hidden_sizes)
        self.depths = list(self.depths)
        self.atrous_rates = list(self.atrous_rates)
        self.rpn_anchor_sizes = list(self.rpn_anchor_sizes)
        self.rpn_aspect_ratios = list(self.rpn_aspect_ratios)
        self._set_stage_names(kwargs)
        super().__post_init__(**kwargs)

    def _set_stage_names(self, kwargs: dict) -> None:
        """`stage_names` (the stem, then one per stage) and the backbone's `out_features` / `out_indices`, taken out
        of the constructor's `kwargs`."""
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )

    def validate_architecture(self):
        """Reject layouts the encoder cannot build, naming the field and the accepted values."""
        if self.block_type not in self.block_types:
            raise ValueError(f"block_type={self.block_type!r} is not one of {', '.join(self.block_types)}")
        if self.pooling not in self.poolings:
            raise ValueError(f"pooling={self.pooling!r} is not one of {', '.join(self.poolings)}")
        if len(self.hidden_sizes) != len(self.depths) or len(self.depths) != 4:
            raise ValueError(
                f"hidden_sizes and depths must both list 4 stages, got {self.hidden_sizes} and {self.depths}"
            )
        if len(self.rpn_anchor_sizes) != 5:
            raise ValueError(f"rpn_anchor_sizes must list one size per FPN level (5), got {self.rpn_anchor_sizes}")
        if self.aspp_channels < 1:
            raise ValueError(f"aspp_channels must be a positive channel count, got {self.aspp_channels}")
        for name in ("output_stride", "segmentation_output_stride"):
            if getattr(self, name) not in (8, 16, 32):
                raise ValueError(f"{name}={getattr(self, name)} is not one of 8, 16, 32")

    @property
    def expansion(self) -> int:
        return 4 if self.block_type == "bottleneck" else 1

    @property
    def stage_channels(self) -> list[int]:
        """Output channels of the stem and of each stage, in `stage_names` order."""
        return [self.stem_width] + [width * self.expansion for width in self.hidden_sizes]

    @property
    def hidden_size(self) -> int:
        """Width of `pooler_output`."""
        return self.stage_channels[-1]


__all__ = ["MuscleConfig"]
