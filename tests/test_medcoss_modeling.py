"""MedCoSS encoder, pretraining and task heads: sizes, parity with the upstream layer, token counts, errors."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation

from hub.catalogue import get_variant
from hub.models.medcoss import (
    MedCossConfig,
    MedCossForImageClassification,
    MedCossForPreTraining,
    MedCossForSemanticSegmentation,
    MedCossModel,
)
from hub.models.medcoss.modeling_medcoss import MedCossLayer, patchify, text_attention_bias


def tiny(**overrides) -> MedCossConfig:
    return get_variant("medcoss-tiny").build_config(**overrides)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_paper_scale_sizes():
    with torch.device("meta"):
        model = MedCossForPreTraining(get_variant("medcoss-vitb").build_config())
    assert sum(p.numel() for p in model.medcoss.encoder.parameters()) == 85_072_896
    assert sum(p.numel() for p in model.medcoss.encoder.layers[0].parameters()) == 7_089_408
    # The released checkpoint holds 199,205,635 values (errata): encoder, MAE decoder and MLM head.
    assert sum(p.numel() for p in model.parameters()) == 199_205_635
    embeddings = model.medcoss.image_embeddings
    assert embeddings.spatial_position_embeddings_2d.weight.shape == (1024, 768)
    assert embeddings.spatial_position_embeddings_3d.weight.shape == (4096, 768)
    assert model.decoder_position_embeddings_2d.shape == (1, 197, 512)
    assert model.decoder_position_embeddings_3d.shape == (1, 145, 512)


def upstream_layer_output(
    layer: MedCossLayer, hidden: torch.Tensor, mask: torch.Tensor | None, heads: int
) -> torch.Tensor:
    """The upstream block: nn.MultiheadAttention with the packed in-projection, pre-norm, layer scale."""
    width = hidden.shape[-1]
    attention = nn.MultiheadAttention(width, heads, batch_first=True)
    attention.in_proj_weight.data.copy_(layer.attention.qkv.weight)
    attention.in_proj_bias.data.copy_(layer.attention.qkv.bias)
    attention.out_proj.load_state_dict(layer.attention.out_proj.state_dict())
    normed = layer.layer_norm1(hidden)
    attended = attention(normed, normed, normed, attn_mask=mask, need_weights=False)[0]
    hidden = hidden + layer.layer_scale1 * attended
    transformed = layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.layer_norm2(hidden))))
    return hidden + layer.layer_scale2 * transformed


def padded_mask(lengths: list[int], length: int) -> torch.Tensor:
    return (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()


def upstream_text_mask(attention_mask: torch.Tensor, heads: int, batch_major: bool) -> torch.Tensor:
    """Upstream's [B, L, L] causal+padding mask, -10000 where blocked, repeated head-major (`.repeat`) as
    upstream does, or batch-major as nn.MultiheadAttention documents."""
    length = attention_mask.shape[1]
    allowed = torch.ones(length, length).tril().bool()[None] & attention_mask.bool()[:, None, :]
    mask = (~allowed).float() * -10000.0
    return mask.repeat_interleave(heads, 0) if batch_major else mask.repeat(heads, 1, 1)


@pytest.mark.parametrize("mode", ["faithful", "corrected", None])
def test_layer_equals_multihead_attention_with_upstream_order(mode):
    config = MedCossConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, text_mask_mode=mode or "faithful"
    )
    torch.manual_seed(0)
    layer = MedCossLayer(config).eval()
    for module in layer.modules():
        for parameter in module.parameters(recurse=False):
            nn.init.normal_(parameter, std=0.3)
    hidden = seeded(3, 10, 64)
    if mode is None:
        bias, reference_mask = None, None
    else:
        attention_mask = padded_mask([10, 4, 7], 10)
        bias = text_attention_bias(attention_mask, 4, mode, -10000.0)
        reference_mask = upstream_text_mask(attention_mask, 4, batch_major=mode == "corrected")
    with torch.no_grad():
        ours = layer(hidden, bias)[0]
        expected = upstream_layer_output(layer, hidden, reference_mask, 4)
    assert (ours - expected).abs().max() <= 1e-5
    assert (ours - hidden).abs().max() > 0.1  # layer scale of 0.3-ish: the block really changes the tokens


def test_faithful_and_corrected_text_masks_differ_only_with_mixed_padding():
    attention_mask = padded_mask([6, 3], 6)
    faithful = text_attention_bias(attention_mask, 2, "faithful", -10000.0)
    corrected = text_attention_bias(attention_mask, 2, "corrected", -10000.0)
    # faithful: sample b, head h gets sample (b * heads + h) mod batch, so both samples' heads see masks (0, 1).
    assert torch.equal(faithful[0, 1], corrected[1, 0]) and torch.equal(faithful[1, 0], corrected[0, 0])
    assert not torch.equal(faithful, corrected)
    same = padded_mask([4, 4], 6)
    assert torch.equal(text_attention_bias(same, 2, "faithful", -1.0), text_attention_bias(same, 2, "corrected", -1.0))
    assert corrected[0, 0, 1, 2] == -10000.0 and corrected[0, 0, 2, 1] == 0.0  # causal: no look-ahead


@pytest.mark.parametrize(
    ("shape", "patches"),
    [((2, 3, 224, 224), 196), ((1, 3, 512, 512), 1024), ((1, 1, 16, 192, 192), 144), ((1, 1, 64, 192, 192), 576)],
)
def test_image_token_counts(shape, patches):
    model = MedCossModel(tiny()).eval()
    with torch.no_grad():
        outputs = model(pixel_values=seeded(*shape), output_hidden_states=True)
        without_cls = model(pixel_values=seeded(*shape), add_cls_token=False)
    assert outputs.last_hidden_state.shape == (shape[0], patches + 1, 32)
    assert without_cls.last_hidden_state.shape == (shape[0], patches, 32)
    assert len(outputs.hidden_states) == 13
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 1:].mean(dim=1))
    assert outputs.path == f"{len(shape) - 2}d"


def test_embeddings_follow_the_upstream_recipe():
    model = MedCossModel(tiny()).eval()
    pixels = seeded(1, 3, 64, 32)
    embeddings = model.image_embeddings
    patches = embeddings.patch_embeddings_2d(pixels).flatten(2).transpose(1, 2)  # raster order, 4 x 2 grid
    rows = embeddings.spatial_position_embeddings_2d.weight[:8] + embeddings.temporal_position_embeddings_2d.weight[0]
    expected = torch.cat([model.cls_token, embeddings.layer_norm(patches + rows)], dim=1)
    with torch.no_grad():
        states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[0], expected)


def test_training_mode_draws_a_temporal_row():
    model = MedCossModel(tiny(drop_path_rate=0.0)).train()
    pixels = seeded(1, 3, 32, 32)
    with torch.no_grad():
        outputs = {tuple(model(pixel_values=pixels).pooler_output[0, :4].tolist()) for _ in range(12)}
    assert len(outputs) > 1


def test_text_path_pools_all_positions_and_uses_the_mask():
    model = MedCossModel(tiny(text_mask_mode="corrected")).eval()
    input_ids = torch.randint(0, 1024, (2, 112), generator=torch.Generator().manual_seed(0))
    attention_mask = padded_mask([112, 40], 112)
    with torch.no_grad():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        alone = model(input_ids=input_ids[1:], attention_mask=attention_mask[1:])
        unmasked = model(input_ids=input_ids[1:])
    assert outputs.last_hidden_state.shape == (2, 112, 32) and outputs.path == "text"
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(dim=1))
    torch.testing.assert_close(outputs.last_hidden_state[1:], alone.last_hidden_state, atol=1e-5, rtol=1e-5)
    # causal: position 10 cannot see the tokens after it, so padding from 40 on does not change it
    torch.testing.assert_close(
        alone.last_hidden_state[:, :40], unmasked.last_hidden_state[:, :40], atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(alone.last_hidden_state[:, 40:], unmasked.last_hidden_state[:, 40:])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"pixel_values": torch.zeros(1, 1, 32, 32)}, r"2D pixel_values must have 3 channel\(s\)"),
        ({"pixel_values": torch.zeros(1, 3, 16, 32, 32)}, r"3D pixel_values must have 1 channel\(s\)"),
        (
            {"pixel_values": torch.zeros(1, 1, 20, 32, 32)},
            r"3D input size \(20, 32, 32\) must be positive multiples of the patch size 16",
        ),
        ({"pixel_values": torch.zeros(1, 3, 528, 512)}, r"1056 patches, more than the 1024 rows"),
        ({"pixel_values": torch.zeros(3, 32, 32)}, "pixel_values must be"),
        ({"input_ids": torch.zeros(1, 513, dtype=torch.long)}, "513 tokens, more than the 512 text positions"),
        ({"input_ids": torch.full((1, 4), 1024)}, r"input_ids must lie in \[0, 1024\)"),
        ({}, "exactly one of pixel_values"),
    ],
)
def test_bad_inputs_fail_clearly(inputs, message):
    with pytest.raises(ValueError, match=message):
        MedCossModel(tiny())(**inputs)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("text_mask_mode", "fixed", "text_mask_mode='fixed'"),
        ("hidden_size", 30, "not a multiple"),
        ("segmentation_layers", [4, 7, 10, 13], "segmentation_layers"),
        ("mask_ratio", 1.5, "mask_ratio"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(Exception, match=message):
        MedCossConfig(**{field: value})


def test_patchify_order_is_row_column_channel():
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(pixels, 2)
    assert patches.shape == (2, 4, 12)
    # second patch (row 0, column 1), its in-patch pixel (1, 0), channel 2
    assert patches[1, 1, (1 * 2 + 0) * 3 + 2] == pixels[1, 2, 1, 2]
    volume = torch.arange(1 * 1 * 4 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    assert patchify(volume, 2)[0, 7, (1 * 2 + 0) * 2 + 1] == volume[0, 0, 3, 2, 3]


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 16, 32, 32)])
def test_mae_loss_only_counts_masked_patches(shape):
    model = MedCossForPreTraining(tiny()).eval()
    pixels = seeded(*shape)
    patches = 4
    noise = torch.rand(2, patches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nothing = model(pixel_values=pixels, noise=noise, mask_ratio=0.0)
        everything = model(pixel_values=pixels, noise=noise, mask_ratio=1.0)
        default = model(pixel_values=pixels, noise=noise)
    target = patchify(pixels, 16)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5

    def per_patch(output):
        return ((output.logits - target) ** 2).mean(-1)

    assert nothing.mask.sum() == 0 and nothing.loss == 0 and per_patch(nothing).min() > 0
    assert everything.mask.sum() == 2 * patches
    torch.testing.assert_close(everything.loss, per_patch(everything).mean())
    assert default.mask.sum(dim=1).tolist() == [3, 3]  # ratio 0.75 of 4 patches
    torch.testing.assert_close(default.loss, per_patch(default)[default.mask.bool()].mean())
    assert default.last_hidden_state.shape == (2, 2, 32)  # cls + the one kept patch
    kept = torch.argsort(noise, dim=1)[:, 0]
    assert torch.equal(default.mask.argmin(dim=1), kept) and torch.equal(default.noise, noise)


def test_pretraining_losses_are_finite_and_backpropagate():
    model = MedCossForPreTraining(tiny()).train()
    for inputs in ({"pixel_values": seeded(2, 3, 32, 32)}, {"pixel_values": seeded(2, 1, 16, 32, 32)}):
        output = model(**inputs)
        assert torch.isfinite(output.loss) and output.noise.shape == (2, 4)
        output.loss.backward()
    input_ids = torch.randint(0, 1024, (2, 112), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, -100)
    labels[:, 5:20] = input_ids[:, 5:20]
    output = model(input_ids=input_ids, attention_mask=padded_mask([112, 60], 112), labels=labels)
    assert output.logits.shape == (2, 112, 1024) and torch.isfinite(output.loss)
    expected = F.cross_entropy(output.logits[:, 5:20].reshape(-1, 1024), input_ids[:, 5:20].reshape(-1))
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.mlm_head.bias.grad is not None and model.decoder_pred_3d.weight.grad is not None


def test_mae_rejects_inputs_beyond_the_decoder_table():
    with pytest.raises(ValueError, match="MAE decoder positions cover 4 patches"):
        MedCossForPreTraining(tiny())(pixel_values=seeded(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("head", "inputs"),
    [
        ("image_2d", {"pixel_values": seeded(2, 3, 32, 32)}),
        ("image_3d", {"pixel_values": seeded(2, 1, 16, 32, 32)}),
        ("text", {"input_ids": torch.randint(0, 1024, (2, 112)), "attention_mask": padded_mask([112, 30], 112)}),
    ],
)
def test_classification_heads(head, inputs):
    model = MedCossForImageClassification(tiny(classifier_head=head, num_labels=3)).eval()
    output = model(**inputs, labels=torch.tensor([0, 2]))
    assert output.logits.shape == (2, 3) and torch.isfinite(output.loss)
    pooled = model.medcoss(**inputs).pooler_output
    if head == "image_2d":
        torch.testing.assert_close(output.logits, model.classifier(model.fc_norm(pooled)))
    assert (model.fc_norm is None) == (head == "text")


@pytest.mark.parametrize(("dims", "shape"), [(2, (2, 3, 64, 48)), (3, (1, 1, 32, 32, 16))])
def test_segmentation_masks_at_input_size(dims, shape):
    model = MedCossForSemanticSegmentation(tiny(segmentation_spatial_dims=dims, num_labels=2)).eval()
    labels = torch.randint(0, 2, (shape[0], *shape[2:]))
    output = model(pixel_values=seeded(*shape), labels=labels)
    assert output.logits.shape == (shape[0], 2, *shape[2:])
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert model.medcoss.encoder.layers[11].mlp.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=f"this segmentation model is {dims}D"):
        model(pixel_values=torch.zeros(1, 3, 32, 32) if dims == 3 else torch.zeros(1, 1, 16, 16, 16))


def test_auto_classes_and_head_loads_encoder_weights(tmp_path):
    config = tiny(num_labels=2)
    encoder = AutoModel.from_config(config)
    assert isinstance(encoder, MedCossModel)
    encoder.save_pretrained(tmp_path)
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path)
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    for model in (classifier, segmenter):
        torch.testing.assert_close(model.medcoss.cls_token, encoder.cls_token)
        torch.testing.assert_close(model.medcoss.encoder.layers[5].layer_scale1, encoder.encoder.layers[5].layer_scale1)


def test_initialisation_matches_upstream():
    model = MedCossForPreTraining(tiny())
    layer = model.medcoss.encoder.layers[0]
    assert torch.all(layer.layer_scale1 == 1e-3) and torch.all(layer.attention.qkv.bias == 0)
    assert torch.all(model.decoder_position_embeddings_2d == 0)
    assert 0.5 < model.medcoss.text_embeddings.word_embeddings.weight.std() < 1.5  # N(0, 1), as PyTorch's default
    assert model.mlm_position_embeddings.weight.std() < 0.05
