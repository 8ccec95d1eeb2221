"""MedCoSS model configuration.

MedCoSS (Ye et al., "Continual Self-supervised Learning: Towards Universal Multi-modal Medical Data
Representation Learning", CVPR 2024, arXiv 2311.17597) trains one Uni-Perceiver-style pre-norm ViT-B on report
text, X-rays, CT, MRI and pathology in sequence. Each modality has its own tokenizer: a WordPiece token table
(1D), a 16x16 patch convolution (2D) and a 16^3 patch convolution (3D), each with learned raster-indexed
position tables that are never interpolated. Defaults describe `medcoss-vitb`, the released model's layout.
"""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class MedCossConfig(PreTrainedConfig):
    r"""
    Configuration of the MedCoSS encoder, its MAE/MLM pretraining heads and its task heads.

    hidden_size / num_hidden_layers / num_attention_heads / intermediate_size: the shared transformer (ViT-B:
        768, 12, 12, 3072); pre-norm blocks with exact GELU, layer scale and no final norm.
    layer_norm_eps (`float`, 1e-5): every encoder and embedding LayerNorm (PyTorch's default, not timm's 1e-6).
    layer_scale_init_value (`float`, 1e-3): initial value of the per-channel residual scales.
    drop_path_rate (`float`, 0.1): stochastic depth, the same in every layer (not a linear ramp).
    patch_size (`int`, 16): side of the square 2D patches and of the cubic 3D patches.
    num_channels / num_channels_3d: input channels of the 2D (3: grey is repeated) and 3D (1) paths.
    image_size (`int`): the square 2D input side used for the golden example, export and the processor.
    max_positions_2d / max_positions_3d (`int`, 1024 / 4096): rows of the raster-indexed spatial tables, so a
        2D input has at most 1024 patches (512x512) and a 3D input at most 4096 (256^3).
    num_temporal_positions (`int`, 8): rows of the temporal tables; row 0 at eval, a random row per forward
        call in training when `random_temporal_position` is set (the upstream pretraining behaviour).
    vocab_size / max_text_positions / type_vocab_size: the 1D path's tables (49,411 rows inherited from
        Uni-Perceiver; MedCoSS only uses the 28,996 Bio_ClinicalBERT ids).
    text_mask_mode (`str`): `"faithful"` reproduces the upstream causal+padding text mask, whose per-sample
        masks are repeated head-major so that with batch > 1 sample b, head h sees the padding of sample
        (b * heads + h) mod batch; `"corrected"` gives every sample its own mask. Converted checkpoints use
        `"faithful"` because that is what the released weights were trained and evaluated with.
    text_mask_value (`float`, -10000): the additive value of blocked text positions.
    image_pooling (`str`): `"patch_mean"` (mean of patch tokens, cls excluded: the upstream downstream recipe)
        or `"cls"`. text_pooling (`str`): `"mean"` (mean of all positions, padding included, as upstream).
    add_cls_token (`bool`): prepend the cls token (no position, no embedding norm) to image tokens.
    pretraining_image_size / pretraining_volume_size: inputs of MAE pretraining; they size the learned decoder
        position tables (224 -> 197 rows, 16x192x192 -> 145 rows).
    decoder_*: the MAE decoder (512 wide, 8 blocks, 16 heads, MLP 2048, LayerNorm eps 1e-6).
    mask_ratio (`float`, 0.75) / norm_pix_loss (`bool`): MAE masking and per-patch normalised targets.
    mlm_layer_norm_eps (`float`, 1e-12): the MLM head's LayerNorm.
    legacy_video_positions (`int`, 1600): rows of the unused Uni-Perceiver video table kept by the pretraining
        model so that the released checkpoint round-trips without loss.
    classifier_head (`str`): `"image_2d"` (LayerNorm eps 1e-6 + Linear on the pooled tokens), `"image_3d"`
        (LayerNorm eps 1e-6 + Linear-LayerNorm-GELU-Linear) or `"text"` (Linear-LayerNorm-GELU-Linear).
    segmentation_layers (`list[int]`): 1-based encoder blocks feeding the UNETR decoder (4, 7, 10, 12).
    segmentation_feature_size (`int`, 16) / segmentation_spatial_dims (`int`, 2 or 3): the UNETR decoder.

    Example:
    ```python
    >>> from hub.models.medcoss import MedCossConfig, MedCossModel
    >>> model = MedCossModel(MedCossConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64))
    ```
    """

    model_type = "medcoss"
    text_mask_modes: ClassVar[tuple[str, ...]] = ("faithful", "corrected")
    image_poolings: ClassVar[tuple[str, ...]] = ("patch_mean", "cls")
    text_poolings: ClassVar[tuple[str, ...]] = ("mean",)
    classifier_heads: ClassVar[tuple[str, ...]] = ("image_2d", "image_3d", "text")

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    layer_scale_init_value: float = 1e-3
    drop_path_rate: float = 0.1
    patch_size: int = 16
    num_channels: int = 3
    num_channels_3d: int = 1
    image_size: int = 224
    max_positions_2d: int = 1024
    max_positions_3d: int = 4096
    num_temporal_positions: int = 8
    random_temporal_position: bool = True
    vocab_size: int = 49411
    max_text_positions: int = 512
    type_vocab_size: int = 2
    text_mask_mode: str = "corrected"
    text_mask_value: float = -10000.0
    image_pooling: str = "patch_mean"
    text_pooling: str = "mean"
    add_cls_token: bool = True
    pretraining_image_size: int = 224
    pretraining_volume_size: list[int] | tuple[int, ...] = (16, 192, 192)
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    decoder_layer_norm_eps: float = 1e-6
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    mlm_layer_norm_eps: float = 1e-12
    legacy_video_positions: int = 1600
    classifier_head: str = "image_2d"
    classifier_layer_norm_eps: float = 1e-6
    segmentation_layers: list[int] | tuple[int, ...] = (4, 7, 10, 12)
    segmentation_feature_size: int = 16
    segmentation_spatial_dims: int = 2
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.pretraining_volume_size = list(self.pretraining_volume_size)
        self.segmentation_layers = list(self.segmentation_layers)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject layouts the model cannot build, naming the field and what it accepts."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(
                f"decoder_hidden_size={self.decoder_hidden_size} is not a multiple of "
                f"decoder_num_attention_heads={self.decoder_num_attention_heads}"
            )
        for field, value, choices in (
            ("text_mask_mode", self.text_mask_mode, self.text_mask_modes),
            ("image_pooling", self.image_pooling, self.image_poolings),
            ("text_pooling", self.text_pooling, self.text_poolings),
            ("classifier_head", self.classifier_head, self.classifier_heads),
        ):
            if value not in choices:
                raise ValueError(f"{field}={value!r} is not one of {', '.join(choices)}")
        if self.image_size % self.patch_size or self.pretraining_image_size % self.patch_size:
            raise ValueError(f"image_size and pretraining_image_size must be multiples of patch_size={self.patch_size}")
        if len(self.pretraining_volume_size) != 3 or any(
            side % self.patch_size for side in self.pretraining_volume_size
        ):
            raise ValueError(
                f"pretraining_volume_size={self.pretraining_volume_size} must be 3 multiples of {self.patch_size}"
            )
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} is not in [0, 1]")
        if len(self.segmentation_layers) != 4 or not all(
            1 <= i <= self.num_hidden_layers for i in self.segmentation_layers
        ):
            raise ValueError(
                f"segmentation_layers={self.segmentation_layers} must name 4 blocks in 1..{self.num_hidden_layers}"
            )
        if self.segmentation_spatial_dims not in (2, 3):
            raise ValueError(f"segmentation_spatial_dims={self.segmentation_spatial_dims} is not 2 or 3")

    @property
    def decoder_positions_2d(self) -> int:
        """Rows of the 2D MAE decoder table: the pretraining patches plus the cls slot (224 -> 197)."""
        return (self.pretraining_image_size // self.patch_size) ** 2 + 1

    @property
    def decoder_positions_3d(self) -> int:
        side = [s // self.patch_size for s in self.pretraining_volume_size]
        return side[0] * side[1] * side[2] + 1

    @property
    def segmentation_channels(self) -> int:
        """Input channels of the UNETR decoder's full-resolution branch: those of its input path."""
        return self.num_channels if self.segmentation_spatial_dims == 2 else self.num_channels_3d


__all__ = ["MedCossConfig"]
