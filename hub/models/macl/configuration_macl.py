"""MACL model configuration.

MACL (Multi-level Asymmetric Contrastive Learning, arXiv 2309.11876, IEEE JBHI) pretrains a 2D U-Net on CT/MRI
slices with a shared encoder, an auxiliary full-resolution branch and a dominant branch that sees the slice
down-sampled by 0.25 and runs two decoder up-blocks. The network facts (F=32, Conv-BatchNorm-LeakyReLU blocks,
BN-free ReLU centre, 512-channel bottleneck, projectors of 128 dims) come from the authors' `network/unet2d.py`.
`spatial_dims=3` is medhub's own extension: every 2D operation is swapped for its 3D twin.
"""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class MaclConfig(PreTrainedConfig):
    r"""
    Configuration of the MACL U-Net, its segmentation head and its pre-training projectors.
    Defaults describe `macl-unet2d` (the authors' CHD/KiTS network).

    num_channels (`int`, defaults to 1): input channels (the BraTS release uses 4: the MRI sequences as channels).
    base_filters (`int`, defaults to 32): F, the width of the first stage; stages use F, 2F, 4F, 8F and the
        bottleneck 16F.
    spatial_dims (`int`, defaults to 2): 2 (the paper) or 3 (medhub's volumetric extension).
    image_size (`int`, defaults to 256): side of the square (cube in 3D) golden input; any side divisible by 16
        works for the encoder and segmentation, by 64 for pre-training.
    negative_slope (`float`, defaults to 0.01): LeakyReLU slope of the contract/expand blocks (PyTorch's default).
    pooling (`str`): how `pooler_output` is made from the bottleneck; only `"mean"` (global average pool, the
        same pooling as the auxiliary global projector).
    projection_dim (`int`, defaults to 128): width of the global and dense projections (upstream
        `int(classes * scale_factor)` = int(512 * 0.25)).
    dominant_scale (`float`, defaults to 0.25): bilinear down-sampling of the dominant branch's views.
    temperature / base_temperature (`float`, 0.1 / 0.07): SupCon temperatures; every contrastive term carries
        the factor temperature / base_temperature, as in the authors' loss.
    slice_threshold (`float`, defaults to 0.1): two slices are positives when their relative positions differ by
        less than this (0.1 for CHD and KiTS, 0.05 for BraTS).
    global_loss_weight / dense_loss_weight / equivariance_loss_weight (`float`, 1.0 / 0.5 / 1.0): the weights
        of the global, dense and equivariant-regularisation losses (the scripts' values).
    segmentation_head_bias (`bool`, defaults to False): bias of the 1x1 fine-tuning head. The released repo lacks
        its fine-tuning network; PCL's `UNet2D` (bias-free) is the inferred one.
    semantic_loss_ignore_index (`int`): label value ignored by the segmentation cross-entropy.

    Example:
    ```python
    >>> from hub.models.macl import MaclConfig, MaclForSemanticSegmentation
    >>> model = MaclForSemanticSegmentation(MaclConfig(spatial_dims=3, base_filters=8, num_labels=3))
    ```
    """

    model_type = "macl"
    poolings: ClassVar[tuple[str, ...]] = ("mean",)
    input_multiple: ClassVar[int] = 16

    num_channels: int = 1
    base_filters: int = 32
    spatial_dims: int = 2
    image_size: int = 256
    negative_slope: float = 0.01
    pooling: str = "mean"
    projection_dim: int = 128
    dominant_scale: float = 0.25
    temperature: float = 0.1
    base_temperature: float = 0.07
    slice_threshold: float = 0.1
    global_loss_weight: float = 1.0
    dense_loss_weight: float = 0.5
    equivariance_loss_weight: float = 1.0
    segmentation_head_bias: bool = False
    semantic_loss_ignore_index: int = 255

    def validate_architecture(self):
        """Reject settings the U-Net cannot build, naming the field and the accepted values."""
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={self.spatial_dims} is not one of 2, 3")
        if self.pooling not in self.poolings:
            raise ValueError(f"pooling={self.pooling!r} is not one of {', '.join(self.poolings)}")
        if self.num_channels < 1 or self.base_filters < 1 or self.projection_dim < 1:
            raise ValueError("num_channels, base_filters and projection_dim must be positive")
        if self.image_size % self.input_multiple:
            raise ValueError(f"image_size={self.image_size} is not a multiple of {self.input_multiple}")
        if not 0.0 < self.dominant_scale <= 1.0:
            raise ValueError(f"dominant_scale={self.dominant_scale} is not in (0, 1]")

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the four skip maps and the bottleneck: F, 2F, 4F, 8F, 16F."""
        return [self.base_filters * 2**level for level in range(5)]

    @property
    def hidden_size(self) -> int:
        """Width of `pooler_output` (the bottleneck, 16F)."""
        return self.stage_channels[-1]


__all__ = ["MaclConfig"]
