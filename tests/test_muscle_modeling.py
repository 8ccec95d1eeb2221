"""MUSCLE encoder and heads: torchvision parity, shapes, losses and save/load round trips."""

import pytest
import torch
import torchvision
from huggingface_hub.errors import StrictDataclassClassValidationError
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from transformers import (
    AutoBackbone,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
)

from hub.catalogue import get_variant
from hub.models.muscle import (
    MuscleBackbone,
    MuscleConfig,
    MuscleForImageClassification,
    MuscleForObjectDetection,
    MuscleForSemanticSegmentation,
    MuscleModel,
)


def torchvision_encoder_keys(builder) -> set[str]:
    return {key for key in builder().state_dict() if not key.startswith("fc.")}


@pytest.mark.parametrize(
    ("variant", "builder", "expected"),
    [
        ("muscle-resnet18", torchvision.models.resnet18, 11_176_512),
        ("muscle-resnet50", torchvision.models.resnet50, 23_508_032),
    ],
)
def test_paper_scale_encoder_matches_torchvision_counts_and_keys(variant, builder, expected):
    with torch.device("meta"):
        model = MuscleModel(get_variant(variant).build_config())
    assert sum(p.numel() for p in model.parameters()) == expected
    assert set(model.state_dict()) == torchvision_encoder_keys(builder)


@pytest.mark.parametrize("output_stride", [32, 8])
def test_encoder_reproduces_torchvision_resnet50_features(output_stride):
    dilation = [False, output_stride <= 16, output_stride <= 8]
    reference = torchvision.models.resnet50(replace_stride_with_dilation=dilation).eval()
    model = MuscleModel(get_variant("muscle-resnet50").build_config(output_stride=output_stride)).eval()
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(reference.children())[:-2])(pixel_values)
        outputs = model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(outputs.last_hidden_state, expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs.pooler_output, expected.mean(dim=(2, 3)))
    assert outputs.last_hidden_state.shape[-1] == 64 // output_stride


def test_encoder_outputs_and_hidden_states(tiny_config):
    model = MuscleModel(tiny_config).eval()
    outputs = model(torch.randn(2, 3, 64, 64), output_hidden_states=True)
    assert outputs.pooler_output.shape == (2, 64)
    assert [tuple(h.shape) for h in outputs.hidden_states] == [
        (2, 8, 16, 16),
        (2, 8, 16, 16),
        (2, 16, 8, 8),
        (2, 32, 4, 4),
        (2, 64, 2, 2),
    ]
    torch.testing.assert_close(outputs.pooler_output, outputs.hidden_states[-1].mean(dim=(2, 3)))
    assert model(torch.randn(1, 3, 64, 64)).hidden_states is None


def test_encoder_rejects_wrong_channels(tiny_config):
    with pytest.raises(
        ValueError, match=r"pixel_values must have shape \(batch, 3, height, width\), got \(1, 1, 64, 64\)"
    ):
        MuscleModel(tiny_config)(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_type", "wide", "block_type='wide'"),
        ("output_stride", 4, "output_stride=4"),
        ("depths", [1, 1], "4 stages"),
        ("aspp_channels", 0, "aspp_channels must be a positive"),
    ],
)
def test_config_rejects_bad_layouts(field, value, message):
    with pytest.raises(Exception, match=message):
        MuscleConfig(**{field: value})


@pytest.mark.parametrize(
    ("problem_type", "labels"),
    [
        ("single_label_classification", torch.tensor([0, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])),
    ],
)
def test_classification_head_shapes_and_loss(tiny_config, problem_type, labels):
    tiny_config.num_labels, tiny_config.problem_type = 3, problem_type
    model = MuscleForImageClassification(tiny_config)
    outputs = model(torch.randn(2, 3, 64, 64), labels=labels)
    assert outputs.logits.shape == (2, 3)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.muscle.conv1.weight.grad is not None


def test_classification_loss_values():
    config = MuscleConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[4, 8, 16, 32], stem_width=8, block_type="basic", num_labels=2
    )
    model = MuscleForImageClassification(config)
    torch.nn.init.zeros_(model.classifier.weight)
    torch.nn.init.zeros_(model.classifier.bias)
    loss = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)))  # uniform logits over 2 classes


@pytest.mark.parametrize("num_labels", [1, 3])
def test_segmentation_head_shapes_and_loss(tiny_config, num_labels):
    tiny_config.num_labels = num_labels
    model = MuscleForSemanticSegmentation(tiny_config)
    labels = torch.randint(0, max(num_labels, 2), (2, 64, 64))
    labels[0, :4, :4] = 255
    outputs = model(torch.randn(2, 3, 64, 64), labels=labels)
    assert outputs.logits.shape == (2, num_labels, 64, 64)
    assert torch.isfinite(outputs.loss)


def test_deeplab_head_is_torchvisions_at_aspp_channels_wide(tiny_config):
    tiny_config.num_labels = 3
    model = MuscleForSemanticSegmentation(tiny_config).eval()
    reference = DeepLabHead(tiny_config.hidden_size, 3, list(tiny_config.atrous_rates)).eval()
    model.decode_head.load_state_dict(reference.state_dict())  # default 256 channels: the same keys and shapes
    features = torch.randn(2, tiny_config.hidden_size, 8, 8)
    torch.testing.assert_close(model.decode_head(features), reference(features), rtol=0, atol=0)

    tiny_config.aspp_channels = 16
    narrow = MuscleForSemanticSegmentation(tiny_config)
    shapes = {name: tuple(tensor.shape) for name, tensor in narrow.decode_head.state_dict().items()}
    assert shapes.keys() == reference.state_dict().keys()
    assert shapes["0.project.0.weight"] == (16, 16 * 5, 1, 1) and shapes["4.weight"] == (3, 16, 1, 1)
    assert narrow(torch.randn(2, 3, 64, 64)).logits.shape == (2, 3, 64, 64)


def detection_labels() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "class_labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [2.0, 2.0, 12.0, 12.0]]),
            "class_labels": torch.tensor([0, 1]),
        },
    ]


def test_detection_settings_are_config_fields():
    config = get_variant("muscle-resnet18-tiny").build_config(
        num_labels=2,
        rpn_anchor_sizes=[16, 32, 64, 128, 256],
        rpn_aspect_ratios=[1.0],
        rpn_post_nms_top_n_test=50,
        rpn_nms_threshold=0.6,
        box_roi_size=5,
        box_head_channels=64,
        box_detections_per_image=7,
        box_score_threshold=0.2,
    )
    model = MuscleForObjectDetection(config)
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.rpn.anchor_generator.num_anchors_per_location() == [1] * 5
    assert (model.rpn._post_nms_top_n["testing"], model.rpn.nms_thresh) == (50, 0.6)
    assert model.roi_heads.box_roi_pool.output_size == (5, 5)
    assert model.roi_heads.box_head.fc6.in_features == config.fpn_channels * 25
    assert model.roi_heads.box_predictor.cls_score.in_features == 64
    assert (model.roi_heads.detections_per_img, model.roi_heads.score_thresh) == (7, 0.2)
    with pytest.raises(StrictDataclassClassValidationError, match="rpn_anchor_sizes"):
        get_variant("muscle-resnet18-tiny").build_config(rpn_anchor_sizes=[32, 64])


def test_detection_head_losses_and_detections(tiny_config):
    tiny_config.num_labels = 2
    model = MuscleForObjectDetection(tiny_config).train()
    outputs = model(torch.rand(2, 3, 64, 64), labels=detection_labels())
    assert set(outputs.loss_dict) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    model.eval()
    with torch.no_grad():
        detections = model(torch.rand(2, 3, 48, 64)).detections
    assert len(detections) == 2
    for detection in detections:
        assert detection["boxes"].shape[1] == 4 and len(detection["scores"]) == len(detection["labels"])
        assert bool(((detection["labels"] >= 0) & (detection["labels"] < 2)).all())
        assert bool((detection["boxes"][:, 2] <= 64).all() and (detection["boxes"][:, 3] <= 48).all())


def test_detection_refuses_labels_in_eval_mode(tiny_config):
    model = MuscleForObjectDetection(tiny_config).eval()
    with pytest.raises(ValueError, match="training mode only"):
        model(torch.rand(1, 3, 64, 64), labels=detection_labels()[:1])


def test_backbone_feature_maps(tiny_config):
    tiny_config.out_features = ["stage1", "stage2", "stage3", "stage4"]
    backbone = AutoBackbone.from_config(tiny_config).eval()
    assert isinstance(backbone, MuscleBackbone)
    maps = backbone(torch.randn(1, 3, 64, 64)).feature_maps
    assert [m.shape[1] for m in maps] == backbone.channels == [8, 16, 32, 64]
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]


HEADS = [
    (MuscleModel, AutoModel),
    (MuscleForImageClassification, AutoModelForImageClassification),
    (MuscleForSemanticSegmentation, AutoModelForSemanticSegmentation),
    (MuscleForObjectDetection, AutoModelForObjectDetection),
    # transformers 5.24's AutoBackbone.from_pretrained asks the Hub whether the id exists before loading, so it
    # cannot load a local folder or run offline; the family class loads the same files.
    (MuscleBackbone, MuscleBackbone),
]


@pytest.mark.parametrize(("model_class", "auto_class"), HEADS, ids=[cls.__name__ for cls, _ in HEADS])
def test_save_then_load_reproduces_outputs_bit_for_bit(tmp_path, tiny_config, model_class, auto_class):
    tiny_config.num_labels = 2
    model = model_class(tiny_config).eval()
    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is model_class
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model(pixel_values), loaded(pixel_values)
    assert_same_outputs(expected, actual)


def assert_same_outputs(expected, actual):
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual)
    elif isinstance(expected, dict):
        for key, value in expected.items():
            if value is not None:
                assert_same_outputs(value, actual[key])
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual)
        for a, b in zip(expected, actual):
            assert_same_outputs(a, b)


def test_encoder_repo_loads_into_every_head(tmp_path, tiny_config):
    encoder = MuscleModel(tiny_config)
    encoder.save_pretrained(tmp_path)
    for auto_class in (AutoModelForImageClassification, AutoModelForSemanticSegmentation, AutoModelForObjectDetection):
        head = auto_class.from_pretrained(tmp_path)
        assert torch.equal(head.muscle.conv1.weight, encoder.conv1.weight)
        assert torch.equal(head.muscle.layer4[0].bn2.running_var, encoder.layer4[0].bn2.running_var)


@pytest.mark.slow
def test_segmentation_encoder_is_dilated_and_learns_lungs_on_phantom_shapes(tiny_config):
    """At 64 px a stride-32 map is 2x2 and DeepLab cannot learn; the head's encoder runs at stride 8."""
    tiny_config.num_labels = 2
    model = MuscleForSemanticSegmentation(tiny_config)
    assert model.muscle.config.output_stride == 8 and model.config.output_stride == 32
    assert model.muscle(torch.randn(1, 3, 64, 64)).last_hidden_state.shape[-1] == 8
    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    lungs = ((((x - 0.4) / 0.25) ** 2 + (y / 0.6) ** 2) < 1) | ((((x + 0.4) / 0.25) ** 2 + (y / 0.6) ** 2) < 1)
    labels = lungs.long().expand(2, 64, 64)
    pixel_values = (0.5 - 0.4 * lungs.float()).expand(2, 3, 64, 64) + 0.05 * torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(40):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = model.eval()(pixel_values).logits.argmax(1) == 1
    dice = 2 * (predicted & lungs).sum() / (predicted.sum() + lungs.sum() * 2)
    assert dice > 0.8
