"""MedCoSS models: one pre-norm ViT-B shared by text, 2D images and 3D volumes, with MAE/MLM and task heads.

Paper: "Continual Self-supervised Learning: Towards Universal Multi-modal Medical Data Representation
Learning" (Ye et al., CVPR 2024, arXiv 2311.17597); weights: the authors' `MedCoSS_Report_Xray_CT_MR_Path_Buffer0.05`
release, converted by `medhub convert medcoss`.

Layout (Uni-Perceiver's): pre-norm blocks `x + g1 * attn(LN1(x))`, `x + g2 * mlp(LN2(x))` with layer scale, exact
GELU, LayerNorm eps 1e-5 and no final norm. Attention runs `scaled_dot_product_attention` on a fused qkv whose
weight has the shape and q, k, v order of the upstream packed in-projection. Image tokens get a raster-indexed
learned position row plus one temporal row, then the embedding LayerNorm, then the cls token (no position, no
norm). This file only imports torch and transformers, so it also runs as remote code from an exported repo.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_medcoss import MedCossConfig


def drop_path(hidden_states: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability `rate`."""
    if rate == 0.0 or not training:
        return hidden_states
    keep = 1.0 - rate
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    return hidden_states * hidden_states.new_empty(shape).bernoulli_(keep) / keep


def fused_self_attention(
    hidden_states: torch.Tensor, qkv: nn.Linear, num_heads: int, attention_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(head_dim)) from one fused q, k, v projection; heads merged back.

    `attention_bias`: additive, broadcastable to (batch, heads, queries, keys).
    """
    batch, length, width = hidden_states.shape
    query, key, value = qkv(hidden_states).view(batch, length, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
    if attention_bias is not None:
        attention_bias = attention_bias.to(query.dtype)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias)
    return context.transpose(1, 2).reshape(batch, length, width)


class MedCossAttention(nn.Module):
    """Multi-head self-attention on a fused qkv projection (the upstream `in_proj_weight` layout, q then k then v)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(fused_self_attention(hidden_states, self.qkv, self.num_heads, attention_bias))

    def probabilities(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax that `forward` applies, (batch, heads, queries, keys)."""
        batch, length, width = hidden_states.shape
        head_dim = width // self.num_heads
        query, key, _ = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = query @ key.transpose(-2, -1) / math.sqrt(head_dim)
        if attention_bias is not None:
            scores = scores + attention_bias.to(scores.dtype)
        return scores.softmax(dim=-1)


class MedCossMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class MedCossLayer(GradientCheckpointingLayer):
    """Pre-norm block with layer scale and drop path, as Uni-Perceiver's fused encoder layer; returns its output
    and, when asked, its attention probabilities."""

    def __init__(self, config: MedCossConfig):
        super().__init__()
        self.drop_path_rate = config.drop_path_rate
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = MedCossAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MedCossMLP(config.hidden_size, config.intermediate_size)
        self.layer_scale1 = nn.Parameter(torch.empty(config.hidden_size))
        self.layer_scale2 = nn.Parameter(torch.empty(config.hidden_size))

    def forward(
        self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        normed = self.layer_norm1(hidden_states)
        probabilities = self.attention.probabilities(normed, attention_bias) if output_attentions else None
        attended = self.attention(normed, attention_bias)
        hidden_states = hidden_states + drop_path(self.layer_scale1 * attended, self.drop_path_rate, self.training)
        transformed = self.mlp(self.layer_norm2(hidden_states))
        hidden_states = hidden_states + drop_path(self.layer_scale2 * transformed, self.drop_path_rate, self.training)
        return (hidden_states, probabilities) if output_attentions else (hidden_states,)


class MedCossEncoder(nn.Module):
    def __init__(self, config: MedCossConfig):
        super().__init__()
        self.layers = nn.ModuleList(MedCossLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
        attentions: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The input followed by the output of every layer (no final norm); when `attentions` is a list, each
        layer's attention probabilities are appended to it."""
        states = [hidden_states]
        for layer in self.layers:
            output, *probabilities = layer(states[-1], attention_bias, output_attentions=attentions is not None)
            states.append(output)
            if attentions is not None:
                attentions.extend(probabilities)
        return states


class MedCossImageEmbeddings(nn.Module):
    """2D and 3D patch tokens: patch conv, raster-indexed spatial row + one temporal row, shared LayerNorm."""

    def __init__(self, config: MedCossConfig):
        super().__init__()
        self.config = config
        size, width = config.patch_size, config.hidden_size
        self.patch_embeddings_2d = nn.Conv2d(config.num_channels, width, size, stride=size)
        self.patch_embeddings_3d = nn.Conv3d(config.num_channels_3d, width, size, stride=size)
        self.spatial_position_embeddings_2d = nn.Embedding(config.max_positions_2d, width)
        self.temporal_position_embeddings_2d = nn.Embedding(config.num_temporal_positions, width)
        self.spatial_position_embeddings_3d = nn.Embedding(config.max_positions_3d, width)
        self.temporal_position_embeddings_3d = nn.Embedding(config.num_temporal_positions, width)
        self.layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def check(self, pixel_values: torch.Tensor) -> tuple[int, ...]:
        """Validate `pixel_values` and return its patch grid; ValueError naming what was expected."""
        config = self.config
        if pixel_values.ndim not in (4, 5):
            raise ValueError(
                "pixel_values must be (batch, channels, height, width) for 2D or (batch, channels, depth, height, "
                f"width) for 3D, got shape {tuple(pixel_values.shape)}"
            )
        dims = pixel_values.ndim - 2
        channels = config.num_channels if dims == 2 else config.num_channels_3d
        if pixel_values.shape[1] != channels:
            raise ValueError(
                f"{dims}D pixel_values must have {channels} channel(s), got shape {tuple(pixel_values.shape)}"
            )
        spatial = tuple(pixel_values.shape[2:])
        if any(side % config.patch_size or side == 0 for side in spatial):
            raise ValueError(
                f"{dims}D input size {spatial} must be positive multiples of the patch size {config.patch_size}"
            )
        grid = tuple(side // config.patch_size for side in spatial)
        limit = config.max_positions_2d if dims == 2 else config.max_positions_3d
        if math.prod(grid) > limit:
            raise ValueError(
                f"{dims}D input size {spatial} gives {math.prod(grid)} patches, more than the {limit} rows of the "
                "position table (positions are never interpolated)"
            )
        return grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, channels, *spatial) -> normalised patch tokens (batch, patches, hidden) in raster order."""
        grid = self.check(pixel_values)
        if len(grid) == 2:
            patches, spatial, temporal = (
                self.patch_embeddings_2d,
                self.spatial_position_embeddings_2d,
                self.temporal_position_embeddings_2d,
            )
        else:
            patches, spatial, temporal = (
                self.patch_embeddings_3d,
                self.spatial_position_embeddings_3d,
                self.temporal_position_embeddings_3d,
            )
        tokens = patches(pixel_values).flatten(2).transpose(1, 2)
        row = 0
        if self.training and self.config.random_temporal_position:
            row = int(torch.randint(self.config.num_temporal_positions, ()).item())
        positions = spatial.weight[: tokens.shape[1]] + temporal.weight[row]
        return self.layer_norm(tokens + positions)


class MedCossTextEmbeddings(nn.Module):
    """Token + absolute position + token type, then LayerNorm; no cls token is added."""

    def __init__(self, config: MedCossConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_text_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > config.max_text_positions:
            raise ValueError(f"input_ids has {length} tokens, more than the {config.max_text_positions} text positions")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {config.vocab_size}), got values up to {int(input_ids.max())}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embedded = (
            self.word_embeddings(input_ids)
            + self.position_embeddings.weight[:length]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.layer_norm(embedded)


def text_attention_bias(attention_mask: torch.Tensor, num_heads: int, mode: str, blocked_value: float) -> torch.Tensor:
    """The causal+padding additive mask, (batch, heads, L, L): key j is open to query i iff j <= i and pad[j] = 1.

    `faithful` reproduces the upstream `.repeat(num_heads, 1, 1)` expansion read in batch-major order, so that
    sample b, head h gets the padding of sample (b * num_heads + h) mod batch; `corrected` gives each sample its own.
    """
    batch, length = attention_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=attention_mask.device)
    bias = bias.masked_fill(~allowed, blocked_value)
    if mode == "faithful":
        return bias.repeat(num_heads, 1, 1).view(batch, num_heads, length, length)
    return bias[:, None].expand(batch, num_heads, length, length)


class MedCossPreTrainedModel(PreTrainedModel):
    config: MedCossConfig
    config_class = MedCossConfig
    base_model_prefix = "medcoss"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video", "text")
    _no_split_modules = ["MedCossLayer", "MedCossDecoderLayer"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Upstream's scheme: Xavier-uniform Linear, unit LayerNorm, N(0, 1) embeddings (PyTorch's default, which
        upstream keeps), PyTorch's default convolutions, N(0, 0.02) cls/mask tokens, zero MAE decoder positions."""
        config = self.config
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, MedCossLayer):
            init.constant_(module.layer_scale1, config.layer_scale_init_value)
            init.constant_(module.layer_scale2, config.layer_scale_init_value)
        elif isinstance(module, MedCossModel):
            init.normal_(module.cls_token, std=config.initializer_range)
        elif isinstance(module, MedCossMLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, MedCossForPreTraining):
            init.normal_(module.mask_token, std=config.initializer_range)
            init.zeros_(module.decoder_position_embeddings_2d)
            init.zeros_(module.decoder_position_embeddings_3d)
            init.normal_(module.legacy_video_position_embeddings, std=1.0)
            init.normal_(module.legacy_video_type_embeddings, std=1.0)
            # Children are initialised first, so this overrides the N(0, 1) default of embeddings.
            init.normal_(module.mlm_position_embeddings.weight, std=config.initializer_range)


@dataclass
class MedCossModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` plus `path`: `"2d"`, `"3d"` or `"text"`, the tokenizer the input took."""

    path: str | None = None


class MedCossModel(MedCossPreTrainedModel):
    """The frozen-encoder view of all three paths.

    `pixel_values` with 4 dims take the 2D path, 5 dims the 3D path; `input_ids` (+ `attention_mask`) the text
    path. `pooler_output` follows the config's recipe: mean of patch tokens (cls excluded) for images, mean of
    all positions (padding included) for text. `hidden_states[i]` is the output of block i (0: embeddings).
    """

    def __init__(self, config: MedCossConfig):
        super().__init__(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.text_embeddings = MedCossTextEmbeddings(config)
        self.image_embeddings = MedCossImageEmbeddings(config)
        self.encoder = MedCossEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The 2D patch embedding (the path `pixel_values` of 4 dims take)."""
        return self.image_embeddings.patch_embeddings_2d

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def text_bias(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}"
            )
        config = self.config
        return text_attention_bias(
            attention_mask, config.num_attention_heads, config.text_mask_mode, config.text_mask_value
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        add_cls_token: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MedCossModelOutput | tuple:
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        return_dict = return_dict if return_dict is not None else config.return_dict
        attentions = [] if output_attentions else None
        if (pixel_values is None) == (input_ids is None):
            raise ValueError("MedCossModel takes exactly one of pixel_values (2D/3D images) or input_ids (text)")
        if input_ids is not None:
            path = "text"
            states = self.encoder(
                self.text_embeddings(input_ids, token_type_ids), self.text_bias(attention_mask, input_ids), attentions
            )
            pooled = states[-1].mean(dim=1)
        else:
            path = f"{pixel_values.ndim - 2}d"
            tokens = self.image_embeddings(pixel_values)
            with_cls = self.config.add_cls_token if add_cls_token is None else add_cls_token
            states = self.encoder(self.prepend_cls(tokens) if with_cls else tokens, attentions=attentions)
            last = states[-1]
            if self.config.image_pooling == "cls" and with_cls:
                pooled = last[:, 0]
            else:
                pooled = (last[:, 1:] if with_cls else last).mean(dim=1)
        output = MedCossModelOutput(
            last_hidden_state=states[-1],
            pooler_output=pooled,
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            path=path,
        )
        # The tuple form leaves out `path`, which is not a tensor.
        return output if return_dict else output.to_tuple()[:-1]


class MedCossDecoderLayer(nn.Module):
    """A timm-style MAE decoder block: pre-norm, fused qkv with bias, GELU MLP, no layer scale."""

    def __init__(self, config: MedCossConfig):
        super().__init__()
        width, eps = config.decoder_hidden_size, config.decoder_layer_norm_eps
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = MedCossDecoderAttention(width, config.decoder_num_attention_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MedCossMLP(width, config.decoder_intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class MedCossDecoderAttention(nn.Module):
    """The MAE decoder's attention, with timm's parameter names (`qkv`, `proj`) as in the upstream checkpoint."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(fused_self_attention(hidden_states, self.qkv, self.num_heads))


class MedCossMLMHead(nn.Module):
    """Dense, GELU, LayerNorm (eps 1e-12), then a vocabulary projection without bias plus a separate bias."""

    def __init__(self, config: MedCossConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.mlm_layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden_states)))) + self.bias


@dataclass
class MedCossPreTrainingOutput(ModelOutput):
    """
    loss: MAE loss over masked patches (images) or MLM cross-entropy (text, when `labels` are given).
    logits: per-patch pixel predictions (batch, patches, patch_pixels) or vocabulary logits (batch, length, vocab).
    last_hidden_state: encoder tokens (cls + visible patches for images; all positions for text), what the
        continual recipe distils.
    mask: (batch, patches), 1 where a patch was masked (images only).
    noise: (batch, patches), the uniform noise whose argsort chose the kept patches (images only).
    ids_restore: (batch, patches), the permutation that undoes the shuffle (images only).
    hidden_states: encoder hidden states when asked for.
    attentions: encoder attention probabilities per layer when asked for.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    ids_restore: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE masking: keep the `(1 - ratio) * N` tokens with the lowest noise; returns kept tokens, mask, ids_restore."""
    batch, length, width = tokens.shape
    if noise.shape != (batch, length):
        raise ValueError(f"noise must have shape {(batch, length)} (batch, patches), got {tuple(noise.shape)}")
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, width))
    mask = torch.ones(batch, length, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, *spatial) -> (B, patches, patch_size^dims * C), in-patch order (depth,) row, column, channel."""
    batch, channels, *spatial = pixel_values.shape
    grid = [side // patch_size for side in spatial]
    shape = [batch, channels] + [v for g in grid for v in (g, patch_size)]
    dims = len(spatial)
    patches = pixel_values.reshape(shape)
    grid_axes = [2 + 2 * i for i in range(dims)]
    inner_axes = [3 + 2 * i for i in range(dims)]
    patches = patches.permute(0, *grid_axes, *inner_axes, 1)
    return patches.reshape(batch, math.prod(grid), patch_size**dims * channels)


def masked_patch_loss(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool
) -> torch.Tensor:
    """Per-patch MSE averaged over masked patches only (0 when nothing is masked); targets optionally normalised
    per patch by their own mean and unbiased variance (eps 1e-6)."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        variance = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (variance + 1e-6) ** 0.5
    per_patch = ((prediction - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


class MedCossForPreTraining(MedCossPreTrainedModel):
    """MAE (2D/3D, masked-patch pixel loss) and MLM (text) pretraining, as in each MedCoSS stage.

    Images: `noise` (batch, patches) may be passed to fix which patches are kept (the distillation of the
    continual recipe feeds student and teacher the same noise); otherwise it is drawn uniformly and returned.
    Text: `labels` (batch, length) with -100 at unmasked positions.
    """

    def __init__(self, config: MedCossConfig):
        super().__init__(config)
        self.medcoss = MedCossModel(config)
        width = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.empty(1, 1, width))
        self.decoder_position_embeddings_2d = nn.Parameter(torch.empty(1, config.decoder_positions_2d, width))
        self.decoder_position_embeddings_3d = nn.Parameter(torch.empty(1, config.decoder_positions_3d, width))
        self.decoder_blocks = nn.ModuleList(
            MedCossDecoderLayer(config) for _ in range(config.decoder_num_hidden_layers)
        )
        self.decoder_norm = nn.LayerNorm(width, eps=config.decoder_layer_norm_eps)
        self.decoder_pred_2d = nn.Linear(width, config.patch_size**2 * config.num_channels)
        self.decoder_pred_3d = nn.Linear(width, config.patch_size**3 * config.num_channels_3d)
        self.mlm_position_embeddings = nn.Embedding(2, config.hidden_size)
        self.mlm_head = MedCossMLMHead(config)
        # Uni-Perceiver's video tables: in the released checkpoint but unused by MedCoSS; kept for lossless round trips.
        self.legacy_video_position_embeddings = nn.Parameter(
            torch.empty(config.legacy_video_positions, config.hidden_size)
        )
        self.legacy_video_type_embeddings = nn.Parameter(torch.empty(1, config.hidden_size))
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> MedCossPreTrainingOutput:
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        if (pixel_values is None) == (input_ids is None):
            raise ValueError("MedCossForPreTraining takes exactly one of pixel_values (MAE) or input_ids (MLM)")
        attentions = [] if output_attentions else None
        if input_ids is not None:
            output = self._mlm(input_ids, attention_mask, token_type_ids, labels, attentions)
        else:
            ratio = config.mask_ratio if mask_ratio is None else mask_ratio
            output = self._mae(pixel_values, ratio, noise, attentions)
        if not output_hidden_states:
            output.hidden_states = None
        output.attentions = tuple(attentions) if output_attentions else None
        return output

    def _mlm(self, input_ids, attention_mask, token_type_ids, labels, attentions) -> MedCossPreTrainingOutput:
        encoder = self.medcoss
        states = encoder.encoder(
            encoder.text_embeddings(input_ids, token_type_ids), encoder.text_bias(attention_mask, input_ids), attentions
        )
        logits = self.mlm_head(states[-1] + self.mlm_position_embeddings.weight[0])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return MedCossPreTrainingOutput(
            loss=loss, logits=logits, last_hidden_state=states[-1], hidden_states=tuple(states)
        )

    def _mae(self, pixel_values, mask_ratio, noise, attentions) -> MedCossPreTrainingOutput:
        encoder = self.medcoss
        tokens = encoder.image_embeddings(pixel_values)
        three_d = pixel_values.ndim == 5
        positions = self.decoder_position_embeddings_3d if three_d else self.decoder_position_embeddings_2d
        if tokens.shape[1] + 1 > positions.shape[1]:
            raise ValueError(
                f"MAE decoder positions cover {positions.shape[1] - 1} patches (pretraining size), "
                f"got {tokens.shape[1]} from input size {tuple(pixel_values.shape[2:])}"
            )
        if noise is None:
            noise = torch.rand(tokens.shape[:2], device=tokens.device)
        kept, mask, ids_restore = random_masking(tokens, mask_ratio, noise)
        states = encoder.encoder(encoder.prepend_cls(kept), attentions=attentions)
        latent = states[-1]
        decoded = self.decoder_embed(latent)
        batch, length = mask.shape
        fill = self.mask_token.expand(batch, length - kept.shape[1], -1)
        unshuffled = torch.gather(
            torch.cat([decoded[:, 1:], fill], dim=1), 1, ids_restore[..., None].expand(-1, -1, decoded.shape[-1])
        )
        decoded = torch.cat([decoded[:, :1], unshuffled], dim=1) + positions[:, : length + 1]
        for block in self.decoder_blocks:
            decoded = block(decoded)
        decoded = self.decoder_norm(decoded)
        prediction = (self.decoder_pred_3d if three_d else self.decoder_pred_2d)(decoded)[:, 1:]
        target = patchify(pixel_values, self.config.patch_size)
        loss = masked_patch_loss(prediction, target, mask, self.config.norm_pix_loss)
        return MedCossPreTrainingOutput(
            loss=loss,
            logits=prediction,
            last_hidden_state=latent,
            mask=mask,
            noise=noise,
            ids_restore=ids_restore,
            hidden_states=tuple(states),
        )


class MedCossMLPClassifier(nn.Module):
    """Linear, LayerNorm (eps 1e-5), GELU, Linear: the 3D and text classification heads upstream."""

    def __init__(self, config: MedCossConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.layer_norm(self.dense(pooled))))


class MedCossForImageClassification(MedCossPreTrainedModel):
    """A classifier on `pooler_output`, by `config.classifier_head`: `image_2d` LayerNorm(1e-6) + Linear;
    `image_3d` LayerNorm(1e-6) + MLP; `text` MLP (no norm). Takes `pixel_values` or `input_ids`."""

    def __init__(self, config: MedCossConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.medcoss = MedCossModel(config)
        self.fc_norm = None
        if config.classifier_head != "text":
            self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.classifier_layer_norm_eps)
        if config.classifier_head == "image_2d":
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        else:
            self.classifier = MedCossMLPClassifier(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.medcoss(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        pooled = outputs.pooler_output if self.fc_norm is None else self.fc_norm(outputs.pooler_output)
        logits = self.classifier(pooled)
        loss = None if labels is None else classification_loss(self.config, logits, labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# Copied from hub.models.muscle.modeling_muscle.problem_type_of with MuscleConfig->MedCossConfig
def problem_type_of(config: MedCossConfig, labels: torch.Tensor) -> str:
    """`config.problem_type`, or, when unset, inferred from the labels as transformers' classification heads do."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


# Copied from hub.models.muscle.modeling_muscle.classification_loss with MuscleConfig->MedCossConfig
def classification_loss(config: MedCossConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, BCE or MSE by `config.problem_type`, inferred from the labels when unset."""
    problem_type = problem_type_of(config, labels)
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _conv(
    dims: int, in_channels: int, out_channels: int, kernel: int, stride: int = 1, bias: bool = False
) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return conv(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _up(dims: int, in_channels: int, out_channels: int) -> nn.Module:
    transposed = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
    return transposed(in_channels, out_channels, 2, stride=2, bias=False)


def _instance_norm(dims: int, channels: int) -> nn.Module:
    return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels)


class MedCossResBlock(nn.Module):
    """UNETR residual block: 3x3 conv, instance norm, LeakyReLU(0.01), 3x3 conv, instance norm, plus a 1x1
    projected shortcut when the width changes, then LeakyReLU."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = _conv(dims, in_channels, out_channels, 3)
        self.norm1 = _instance_norm(dims, out_channels)
        self.conv2 = _conv(dims, out_channels, out_channels, 3)
        self.norm2 = _instance_norm(dims, out_channels)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(_conv(dims, in_channels, out_channels, 1), _instance_norm(dims, out_channels))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.shortcut is None else self.shortcut(hidden_states)
        hidden_states = F.leaky_relu(self.norm1(self.conv1(hidden_states)), 0.01)
        hidden_states = self.norm2(self.conv2(hidden_states))
        return F.leaky_relu(hidden_states + residual, 0.01)


class MedCossProjectionUpBlock(nn.Module):
    """Token map -> skip feature: a 2x transposed conv, then `steps` x (2x transposed conv + residual block)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, steps: int):
        super().__init__()
        self.initial = _up(dims, in_channels, out_channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(_up(dims, out_channels, out_channels), MedCossResBlock(dims, out_channels, out_channels))
            for _ in range(steps)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.initial(hidden_states)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class MedCossUpBlock(nn.Module):
    """2x transposed conv, concatenation with the skip, residual block."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.up = _up(dims, in_channels, out_channels)
        self.block = MedCossResBlock(dims, 2 * out_channels, out_channels)

    def forward(self, hidden_states: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(hidden_states), skip], dim=1))


class MedCossUnetrDecoder(nn.Module):
    """UNETR decoder on 4 encoder blocks (feature size F): full-resolution residual block on the input, skips at
    1/2, 1/4, 1/8 (widths 2F, 4F, 8F) from blocks 4, 7, 10, and the last block at 1/16, then a 1x1 out conv."""

    def __init__(self, config: MedCossConfig):
        super().__init__()
        dims, size, hidden = config.segmentation_spatial_dims, config.segmentation_feature_size, config.hidden_size
        self.encoder1 = MedCossResBlock(dims, config.segmentation_channels, size)
        self.encoder2 = MedCossProjectionUpBlock(dims, hidden, 2 * size, 2)
        self.encoder3 = MedCossProjectionUpBlock(dims, hidden, 4 * size, 1)
        self.encoder4 = MedCossProjectionUpBlock(dims, hidden, 8 * size, 0)
        self.decoder5 = MedCossUpBlock(dims, hidden, 8 * size)
        self.decoder4 = MedCossUpBlock(dims, 8 * size, 4 * size)
        self.decoder3 = MedCossUpBlock(dims, 4 * size, 2 * size)
        self.decoder2 = MedCossUpBlock(dims, 2 * size, size)
        self.out = _conv(dims, size, config.num_labels, 1, bias=True)

    def forward(self, pixel_values: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        first, second, third, last = maps
        hidden = self.decoder5(last, self.encoder4(third))
        hidden = self.decoder4(hidden, self.encoder3(second))
        hidden = self.decoder3(hidden, self.encoder2(first))
        return self.out(self.decoder2(hidden, self.encoder1(pixel_values)))


class MedCossForSemanticSegmentation(MedCossPreTrainedModel):
    """UNETR-style segmentation (2D or 3D by `config.segmentation_spatial_dims`); no cls token, as upstream.

    Logits come back at the input size. `labels`: class indices (batch, *spatial) or per-channel binary targets
    (batch, num_labels, *spatial); loss = sigmoid Dice (smooth 1) + BCE over the label channels, as upstream.
    """

    def __init__(self, config: MedCossConfig):
        super().__init__(config)
        self.medcoss = MedCossModel(config)
        self.decode_head = MedCossUnetrDecoder(config)
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
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        dims = self.config.segmentation_spatial_dims
        if pixel_values.ndim != dims + 2:
            raise ValueError(
                f"this segmentation model is {dims}D; pixel_values must have "
                f"{dims + 2} dims, got shape {tuple(pixel_values.shape)}"
            )
        outputs = self.medcoss(
            pixel_values=pixel_values,
            add_cls_token=False,
            output_hidden_states=True,
            output_attentions=output_attentions,
            return_dict=True,
        )
        grid = [side // self.config.patch_size for side in pixel_values.shape[2:]]
        maps = [
            outputs.hidden_states[index].transpose(1, 2).reshape(pixel_values.shape[0], -1, *grid)
            for index in self.config.segmentation_layers
        ]
        logits = self.decode_head(pixel_values, maps)
        loss = None if labels is None else dice_bce_loss(logits, labels)
        return SemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )


def dice_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sigmoid Dice (smooth 1, per channel over the batch) + BCE-with-logits."""
    channels = logits.shape[1]
    if labels.ndim == logits.ndim - 1:
        if channels == 1:
            target = labels[:, None].to(logits.dtype)
        else:
            target = F.one_hot(labels.long(), channels).movedim(-1, 1).to(logits.dtype)
    else:
        target = labels.to(logits.dtype)
    if target.shape != logits.shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}")
    probabilities = torch.sigmoid(logits)
    axes = [0] + list(range(2, logits.ndim))
    intersection = (probabilities * target).sum(dim=axes)
    dice = 1 - (2 * intersection + 1) / (probabilities.sum(dim=axes) + target.sum(dim=axes) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


__all__ = [
    "MedCossForImageClassification",
    "MedCossForPreTraining",
    "MedCossForSemanticSegmentation",
    "MedCossModel",
    "MedCossPreTrainedModel",
]
