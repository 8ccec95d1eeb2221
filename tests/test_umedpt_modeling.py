"""UMedPT encoder and heads: torchvision Swin V2 parity, squeezer, shapes, losses and bad input."""

import math

import pytest
import torch
import torchvision
from transformers import AutoBackbone, AutoModelForImageClassification
from umedpt_fixtures import torchvision_swin_v2

from hub.catalogue import get_variant
from hub.models.umedpt import (
    UmedptConfig,
    UmedptForImageClassification,
    UmedptForObjectDetection,
    UmedptForSemanticSegmentation,
    UmedptModel,
)
from hub.models.umedpt.modeling_umedpt import log_scaled_classification_loss


def tiny(**overrides) -> UmedptConfig:
    return get_variant("umedpt-tiny").build_config(**overrides)


def test_paper_scale_encoder_is_torchvision_swin_v2_t_without_head_plus_squeezer():
    with torch.device("meta"):
        model = UmedptModel(get_variant("umedpt-swinv2-t").build_config())
        reference = torchvision.models.swin_v2_t()
    swin = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    swin_count = sum(p.numel() for name, p in reference.named_parameters() if not name.startswith("head."))
    squeezer_count = 768 * 512 + 512 + 2 * 512  # 1x1 conv with bias, GroupNorm(1, 512)
    assert sum(p.numel() for p in model.parameters()) == swin_count + squeezer_count == 27_977_322
    state = model.state_dict()
    assert set(state) - set(swin) == {
        "squeezer.conv.weight",
        "squeezer.conv.bias",
        "squeezer.norm.weight",
        "squeezer.norm.bias",
    }
    assert all(state[key].shape == value.shape for key, value in swin.items())


def test_stage_maps_reproduce_torchvision_swin_v2_features():
    config = UmedptConfig(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4, image_size=64)
    reference = torchvision_swin_v2(embed_dim=24).eval()
    model = UmedptModel(config).eval()
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}, strict=False
    )
    assert set(missing) == {k for k in model.state_dict() if k.startswith("squeezer.")} and not unexpected
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
        expected = reference.features(pixel_values).permute(0, 3, 1, 2)
        latent, pooled = model.squeezer(expected)
    torch.testing.assert_close(outputs.hidden_states[-1], expected, rtol=0, atol=0)
    assert [tuple(m.shape[1:]) for m in outputs.hidden_states] == [
        (24, 16, 16),
        (24, 16, 16),
        (48, 8, 8),
        (96, 4, 4),
        (192, 2, 2),
    ]
    torch.testing.assert_close(outputs.pooler_output, pooled)
    torch.testing.assert_close(outputs.last_hidden_state, latent)


def test_squeezer_pools_then_squeezes():
    model = UmedptModel(tiny()).eval()
    squeezer = model.squeezer
    last = torch.randn(2, 128, 2, 2)
    expected = torch.nn.functional.gelu(squeezer.norm(squeezer.conv(last.mean(dim=(2, 3), keepdim=True)))).flatten(1)
    torch.testing.assert_close(squeezer(last)[1], expected)
    # GroupNorm(1, C) on a 1x1 map normalises across channels: before the affine, mean 0 and variance 1.
    assert isinstance(squeezer.norm, torch.nn.GroupNorm) and squeezer.norm.num_groups == 1


def test_classification_head_and_loss_divided_by_ln_classes(tmp_path):
    UmedptModel(tiny()).save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=5).eval()
    assert isinstance(model, UmedptForImageClassification)
    head = model.classifier
    assert isinstance(head[0], torch.nn.Dropout) and head[0].p == 0.2 and isinstance(head[1], torch.nn.ReLU)
    labels = torch.tensor([0, 4])
    outputs = model(torch.rand(2, 3, 64, 64), labels=labels)
    assert outputs.logits.shape == (2, 5)
    expected = torch.nn.functional.cross_entropy(outputs.logits, labels) / math.log(5)
    torch.testing.assert_close(outputs.loss, expected)


@pytest.mark.parametrize(
    ("problem_type", "logits", "labels", "expected"),
    [
        ("single_label_classification", torch.zeros(2, 4), torch.tensor([0, 3]), 1.0),  # ln 4 / ln 4
        ("multi_label_classification", torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), 1.0),
        ("regression", torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]), 2.5),  # MSE, not scaled
    ],
)
def test_log_scaled_classification_loss_weighs_by_problem_type(problem_type, logits, labels, expected):
    config = tiny(num_labels=logits.shape[1], problem_type=problem_type)
    loss = log_scaled_classification_loss(config, logits, labels)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_segmentation_logits_and_dice_focal_loss():
    model = UmedptForSemanticSegmentation(tiny(num_labels=3))
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[0, :8] = -1  # ignored
    outputs = model(torch.rand(2, 3, 64, 64), labels=labels)
    assert outputs.logits.shape == (2, 3, 64, 64)
    assert torch.isfinite(outputs.loss) and outputs.loss > 0
    outputs.loss.backward()
    assert model.umedpt.features[0][0].weight.grad.abs().sum() > 0
    assert model.head.in_channels == 8 and model.decoder.blocks[0].conv1[1].num_groups == 1


def test_detection_losses_with_boxes_and_detections_in_eval():
    model = UmedptForObjectDetection(tiny(num_labels=2)).train()
    labels = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "class_labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)},
    ]
    outputs = model(torch.rand(2, 3, 64, 64), labels=labels)
    assert set(outputs.loss_dict) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert torch.isfinite(outputs.loss) and outputs.loss > 0
    outputs.loss.backward()
    assert len(model.fpn.layer_blocks) == 3 and model.head.cls_tower[1].num_groups == 32
    detections = model.eval()(torch.rand(1, 3, 64, 64)).detections
    assert detections[0]["boxes"].shape[1] == 4 and len(detections[0]["boxes"]) <= model.config.detections_per_image


def test_backbone_gives_stage_maps():
    backbone = AutoBackbone.from_config(tiny(out_features=["stage2", "stage4"]))
    maps = backbone(torch.rand(1, 3, 64, 64)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 32, 8, 8), (1, 128, 2, 2)]


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 3, 48, 64), "multiples of 32"), ((1, 1, 64, 64), "must have shape"), ((3, 64, 64), "must have shape")],
)
def test_bad_inputs_are_refused_with_a_clear_error(shape, message):
    with pytest.raises(ValueError, match=message):
        UmedptModel(tiny())(torch.rand(shape))


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="labels must have shape"):
        UmedptForSemanticSegmentation(tiny(num_labels=2))(
            torch.rand(1, 3, 64, 64), labels=torch.zeros(1, 32, 32, dtype=torch.long)
        )


def test_points_match_the_smallest_box_around_them_and_side_distances_round_trip():
    from hub.models.umedpt.modeling_umedpt import decode_side_distances, encode_side_distances, match_points

    centres = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0], [28.0, 28.0]])
    anchors = torch.cat([centres - 4, centres + 4], dim=1)  # stride-8 points
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 16.0, 8.0]])
    matched = match_points(anchors, boxes, [5], center_sampling_radius=1.5)
    assert matched.tolist() == [0, 1, 0, 0, -1]  # (12, 4) lies in both: the smaller box; (28, 28) in none
    assert match_points(anchors, boxes[:0], [5], 1.5).tolist() == [-1] * 5
    distances = encode_side_distances(anchors[:1], boxes[:1])
    assert distances.tolist() == [[0.5, 0.5, 1.5, 1.5]]  # 4 px left/top, 12 px right/bottom, per 8 px stride
    assert torch.equal(decode_side_distances(distances, anchors[:1]), boxes[:1])
