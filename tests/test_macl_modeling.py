"""MACL U-Net: paper-scale size, encoder/decoder split shared by name, 2D and 3D heads, pre-training losses."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModel, AutoModelForPreTraining, AutoModelForSemanticSegmentation

from hub.catalogue import get_variant
from hub.models.macl import MaclConfig, MaclForPreTraining, MaclForSemanticSegmentation, MaclModel
from hub.models.macl.modeling_macl import supcon_loss

# The authors' UNet2D_classification_MACL with F=32 and 1 input channel (the paper's Table VIII says 8.63 M).
PAPER_COUNT = 8_616_576


def tiny(**overrides) -> MaclConfig:
    return get_variant("macl-tiny").build_config(**overrides)


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_paper_scale_unet_has_the_authors_parameter_count():
    with torch.device("meta"):
        model = MaclForPreTraining(get_variant("macl-unet2d").build_config())
        brats = MaclForPreTraining(get_variant("macl-unet2d").build_config(num_channels=4))
    assert count(model) == PAPER_COUNT
    assert abs(count(model) - 8.63e6) / 8.63e6 < 0.005
    assert count(model.macl) == 4_713_568 and count(model.decoder) == 3_049_760
    assert count(brats) == 8_617_440
    assert model.state_dict()["macl.encoder.center.2.weight"].shape == (512, 512, 3, 3)


def test_encoder_returns_pooled_bottleneck_and_skip_maps():
    model = MaclModel(tiny()).eval()
    outputs = model(torch.randn(2, 1, 64, 64), output_hidden_states=True)
    assert [tuple(m.shape[1:]) for m in outputs.hidden_states] == [
        (4, 64, 64),
        (8, 32, 32),
        (16, 16, 16),
        (32, 8, 8),
        (64, 4, 4),
    ]
    assert outputs.last_hidden_state.shape == (2, 64, 4, 4)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(dim=(2, 3)))
    assert (outputs.last_hidden_state >= 0).all()  # the centre ends in a ReLU


def test_segmentation_and_pretraining_share_weights_by_name(tmp_path):
    pretraining = MaclForPreTraining(tiny())
    pretraining.save_pretrained(tmp_path / "pre")
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "pre", num_labels=3)
    encoder = AutoModel.from_pretrained(tmp_path / "pre")
    for key, value in pretraining.state_dict().items():
        if key.startswith(("macl.", "decoder.")):
            torch.testing.assert_close(segmenter.state_dict()[key], value, rtol=0, atol=0)
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, pretraining.state_dict()["macl." + key], rtol=0, atol=0)
    assert segmenter.head.weight.shape == (3, 4, 1, 1) and segmenter.head.bias is None
    assert isinstance(AutoModelForPreTraining.from_pretrained(tmp_path / "pre"), MaclForPreTraining)


def test_2d_segmentation_gives_full_resolution_logits_and_a_loss():
    model = MaclForSemanticSegmentation(tiny(num_labels=3))
    labels = torch.randint(0, 3, (2, 64, 64))
    outputs = model(torch.randn(2, 1, 64, 64), labels=labels)
    assert outputs.logits.shape == (2, 3, 64, 64)
    expected = torch.nn.functional.cross_entropy(outputs.logits, labels)
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert model.macl.encoder.contr_1_1[0].weight.grad.abs().sum() > 0


def test_3d_variant_segments_a_volume():
    config = tiny(spatial_dims=3, num_labels=2, image_size=32)
    model = MaclForSemanticSegmentation(config)
    assert isinstance(model.macl.encoder.contr_1_1[0], torch.nn.Conv3d)
    volume, labels = torch.randn(1, 1, 16, 32, 32), torch.randint(0, 2, (1, 16, 32, 32))
    outputs = model(volume, labels=labels)
    assert outputs.logits.shape == (1, 2, 16, 32, 32)
    assert torch.isfinite(outputs.loss) and outputs.loss > 0
    assert MaclModel(config)(volume).pooler_output.shape == (1, 64)


@pytest.mark.slow
def test_pretraining_outputs_and_losses():
    model = MaclForPreTraining(tiny())
    views = [torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    outputs = model(*views, slice_positions=torch.tensor([0.1, 0.15, 0.5, 0.9]))
    assert outputs.auxiliary_bottleneck.shape == (4, 64, 4, 4) and outputs.dominant_bottleneck.shape == (4, 64, 1, 1)
    assert outputs.auxiliary_dense.shape == outputs.dominant_dense.shape == (4, 16, 4, 4)
    assert outputs.auxiliary_global.shape == outputs.dominant_global.shape == (4, 16)
    config = model.config
    total = (
        config.global_loss_weight * outputs.loss_global
        + config.dense_loss_weight * outputs.loss_dense
        + config.equivariance_loss_weight * outputs.loss_equivariance
    )
    torch.testing.assert_close(outputs.loss, total)
    assert all(torch.isfinite(value) for value in (outputs.loss_global, outputs.loss_dense, outputs.loss_equivariance))
    outputs.loss.backward()
    assert model.decoder.expand_3_1[0].weight.grad.abs().sum() > 0
    assert model.decoder.expand_1_1[0].weight.grad is None  # up-blocks 3-4 get no gradient, as upstream
    assert model(*views).loss is None


def test_supcon_loss_known_values():
    batch = 3
    same = torch.ones(batch, 5)
    # Identical features: every other row is a positive with log-probability -log(2B - 1).
    loss = supcon_loss(same, same, torch.ones(batch, batch, dtype=torch.bool), 0.1, 0.07)
    torch.testing.assert_close(loss, torch.tensor(0.1 / 0.07 * math.log(2 * batch - 1)))
    # Orthogonal slices with only their own other view as positive: near-perfect separation gives ~0.
    eye = torch.eye(batch, 5) * 10
    loss = supcon_loss(eye, eye, torch.eye(batch, dtype=torch.bool), 0.01, 0.01)
    assert loss < 1e-3


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 3, 64, 64), "must have shape"), ((1, 1, 40, 64), "multiples of 16"), ((1, 1, 16, 64, 64), "must have shape")],
)
def test_bad_inputs_are_refused_with_a_clear_error(shape, message):
    with pytest.raises(ValueError, match=message):
        MaclModel(tiny())(torch.randn(shape))


def test_bad_labels_config_and_pretraining_sizes_are_refused():
    model = MaclForSemanticSegmentation(tiny(num_labels=2))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.randn(1, 1, 32, 32), labels=torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(StrictDataclassClassValidationError, match="spatial_dims=4"):
        tiny(spatial_dims=4)
    views = [torch.randn(2, 1, 32, 32)] * 4
    with pytest.raises(ValueError, match="multiples of 64"):
        MaclForPreTraining(tiny())(*views)
