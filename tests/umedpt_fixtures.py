"""Shared helper of the UMedPT tests: the torchvision Swin V2 that the authors' release wraps."""

from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2


def torchvision_swin_v2(embed_dim: int) -> SwinTransformer:
    """torchvision's Swin V2 at the tiny variant's depths (1, 1, 2, 1), heads (1, 2, 4, 8) and window 4."""
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=embed_dim,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=[4, 4],
        block=SwinTransformerBlockV2,
        downsample_layer=PatchMergingV2,
    )
