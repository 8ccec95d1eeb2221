"""UMedPT model configuration.

UMedPT (Schäfer et al., "Overcoming data scarcity in biomedical imaging with a foundational multi-task model",
Nat. Comput. Sci. 2024, arXiv 2311.09847) trains one shared encoder on many classification, segmentation and
detection tasks at once. The authors' framework wraps torchvision's Swin V2 and a 1x1 "squeezer"; the released
file could not be inspected, so some facts are unconfirmed and are config fields with the most likely value:

- `squeezer_channels=512`: the released embedding is 512-d (seen in third-party code), which implies a 1x1 conv
  768 -> 512; unconfirmed.
- `squeezer_bias=True`: whether that conv has a bias (PyTorch's default); unconfirmed.
- Swin V2-T itself (`embed_dim`, `depths`, `num_heads`, `window_size`): the framework's default backbone, consistent
  with the 256x256 / divisible-by-32 inputs of the official notebook; unconfirmed for the released file.
- `pooling="mean"`: the squeezer can also use attention pooling; global average pooling is the default.
"""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig


@strict
class UmedptConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of the UMedPT encoder (Swin V2 + squeezer) and its task heads. Defaults describe
    `umedpt-swinv2-t`. Fields marked [U] are unconfirmed facts of the release (see the module docstring).

    num_channels (`int`, defaults to 3): input channels ([0, 1] RGB, no mean/std normalisation).
    patch_size / embed_dim / depths / num_heads / window_size / mlp_ratio: the Swin V2 encoder (torchvision's
        `swin_v2_t`: 4, 96, [2, 2, 6, 2], [3, 6, 12, 24], 8, 4.0) [U].
    stochastic_depth_prob / dropout / attention_dropout: Swin regularisation (torchvision's values).
    layer_norm_eps (`float`): epsilon of Swin's LayerNorms.
    squeezer_channels (`int | None`, defaults to 512): output of the squeezer's 1x1 conv; None keeps the last
        stage's width without a conv [U].
    squeezer_bias (`bool`, defaults to True): bias of that conv [U].
    image_size (`int`, defaults to 256): square side of the golden input; sides must be multiples of 32.
    pooling (`str`): `pooler_output` recipe; only `"mean"`: GELU(GroupNorm(conv1x1(global average of the last
        stage))), the squeezer's hidden vector [U: attention pooling exists upstream].
    classifier_dropout (`float`, defaults to 0.2): dropout of the classification head (Dropout, ReLU, Linear).
    decoder_channels (`list[int]`): U-Net decoder widths (96, 64, 32, 16), output at half resolution.
    segmentation_dropout (`float`): Dropout2d before the segmentation conv (0: none).
    semantic_loss_ignore_index (`int`, defaults to -1): label value ignored by Dice and focal losses.
    focal_gamma (`float`): focal loss exponent of segmentation and detection.
    fpn_channels (`int`, defaults to 128): FCOS feature pyramid width (P3-P7, strides 8-128).
    detection_num_convs (`int`, defaults to 4): convs of each shared tower (3x3, GroupNorm(32), GELU).
    detection_focal_alpha / detection_iou_weight / detection_centerness_weight: FCOS loss settings (0.25, 1, 0.2;
        the classification term is also divided by ln C).
    detection_center_sampling (`bool`, defaults to False): FCOS centre sampling (radius 1.5) when True.
    detection_score_threshold / detection_nms_threshold / detection_topk / detections_per_image: test settings.
    """

    model_type = "umedpt"
    attribute_map: ClassVar[dict[str, str]] = {"num_attention_heads": "num_heads"}
    poolings: ClassVar[tuple[str, ...]] = ("mean",)

    num_channels: int = 3
    patch_size: int = 4
    embed_dim: int = 96
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 8
    mlp_ratio: float = 4.0
    stochastic_depth_prob: float = 0.2
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    squeezer_channels: int | None = 512
    squeezer_bias: bool = True
    image_size: int = 256
    pooling: str = "mean"
    classifier_dropout: float = 0.2
    decoder_channels: list[int] | tuple[int, ...] = (96, 64, 32, 16)
    segmentation_dropout: float = 0.0
    semantic_loss_ignore_index: int = -1
    focal_gamma: float = 2.0
    fpn_channels: int = 128
    detection_num_convs: int = 4
    detection_focal_alpha: float = 0.25
    detection_iou_weight: float = 1.0
    detection_centerness_weight: float = 0.2
    detection_center_sampling: bool = False
    detection_score_threshold: float = 0.05
    detection_nms_threshold: float = 0.5
    detection_topk: int = 1000
    detections_per_image: int = 100

    def __post_init__(self, **kwargs):
        self.depths = list(self.depths)
        self.num_heads = list(self.num_heads)
        self.decoder_channels = list(self.decoder_channels)
        self._set_stage_names(kwargs)
        super().__post_init__(**kwargs)

    # Copied from hub.models.muscle.configuration_muscle.MuscleConfig._set_stage_names
    def _set_stage_names(self, kwargs: dict) -> None:
        """`stage_names` (the stem, then one per stage) and the backbone's `out_features` / `out_indices`, taken out
        of the constructor's `kwargs`."""
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )

    def validate_architecture(self):
        """Reject layouts the encoder and heads cannot build, naming the field."""
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"depths and num_heads must both list 4 stages, got {self.depths} and {self.num_heads}")
        for width, heads in zip(self.stage_channels, self.num_heads):
            if width % heads:
                raise ValueError(f"num_heads={self.num_heads} must divide the stage widths {self.stage_channels}")
        if self.pooling not in self.poolings:
            raise ValueError(f"pooling={self.pooling!r} is not one of {', '.join(self.poolings)}")
        if len(self.decoder_channels) != 4:
            raise ValueError(f"decoder_channels must list 4 widths, got {self.decoder_channels}")
        if self.fpn_channels % 32:
            raise ValueError(f"fpn_channels={self.fpn_channels} must be a multiple of 32 (GroupNorm(32) towers)")
        if self.image_size % self.input_multiple:
            raise ValueError(f"image_size={self.image_size} is not a multiple of {self.input_multiple}")

    @property
    def stage_channels(self) -> list[int]:
        """Widths of the four Swin stages (96, 192, 384, 768 for Swin V2-T)."""
        return [self.embed_dim * 2**index for index in range(len(self.depths))]

    @property
    def hidden_size(self) -> int:
        """Width of `pooler_output` and of the squeezed map."""
        return self.squeezer_channels or self.stage_channels[-1]

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this: the patch size times the three patch mergings (32)."""
        return self.patch_size * 2 ** (len(self.depths) - 1)


__all__ = ["UmedptConfig"]
