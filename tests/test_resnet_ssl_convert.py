"""`medhub convert resnet50-ssl`: SSL ResNet-50 checkpoints become muscle repos that give the same features."""

import argparse
import json

import pytest
import torch
import torchvision
from transformers import AutoModel

from hub.export import weights_metadata
from hub.export.checksums import sha256_file


@pytest.fixture(scope="module")
def source_network():
    torch.manual_seed(0)
    network = torchvision.models.resnet50().eval()
    for module in network.modules():  # non-trivial BN statistics so a wrong mapping shows in the features
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return network


def encoder_tensors(network) -> dict[str, torch.Tensor]:
    return {k: v for k, v in network.state_dict().items() if not k.startswith("fc.")}


def moco_v2_checkpoint(network) -> dict:
    state = {f"module.encoder_q.{k}": v for k, v in encoder_tensors(network).items()}
    state["module.encoder_q.fc.0.weight"] = torch.randn(2048, 2048)
    state["module.encoder_q.fc.0.bias"] = torch.zeros(2048)
    state["module.encoder_q.fc.2.weight"] = torch.randn(128, 2048)
    state["module.encoder_q.fc.2.bias"] = torch.zeros(128)
    state["module.encoder_k.conv1.weight"] = torch.randn(64, 3, 7, 7)
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "args": argparse.Namespace(lr=0.03, moco_t=0.2)}


def swav_checkpoint(network) -> dict:
    state = {f"module.{k}": v for k, v in encoder_tensors(network).items()}
    state["module.projection_head.0.weight"] = torch.randn(16, 2048)
    state["module.prototypes.weight"] = torch.randn(8, 16)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("make_checkpoint", [moco_v2_checkpoint, swav_checkpoint], ids=["moco-v2", "swav"])
def test_converted_repo_gives_the_source_features(tmp_path, cli, source_network, make_checkpoint):
    checkpoint = tmp_path / "checkpoint.pth.tar"
    torch.save(make_checkpoint(source_network), checkpoint)
    result = cli("convert", "resnet50-ssl", checkpoint, "--out", tmp_path / "repo", "--license", "cc-by-nc-4.0")
    assert result.code == 0, result.err
    model = AutoModel.from_pretrained(tmp_path / "repo").eval()
    pixel_values = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(source_network.children())[:-1])(pixel_values).flatten(1)
        actual = model(pixel_values).pooler_output
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    source = json.loads(weights_metadata(tmp_path / "repo" / "model.safetensors")["source"])
    assert source["kind"] == "converted" and source["details"]["sha256"] == sha256_file(checkpoint)
    assert cli("verify", tmp_path / "repo").code == 0


def test_missing_encoder_key_is_named(tmp_path, cli, source_network):
    checkpoint_data = moco_v2_checkpoint(source_network)
    del checkpoint_data["state_dict"]["module.encoder_q.layer3.2.bn2.running_var"]
    torch.save(checkpoint_data, tmp_path / "broken.pth")
    result = cli("convert", "resnet50-ssl", tmp_path / "broken.pth", "--out", tmp_path / "repo")
    assert result.code == 1
    assert "no encoder key layer3.2.bn2.running_var" in result.err
    assert not (tmp_path / "repo").exists()


class NotAllowed:
    pass


def test_objects_outside_the_allow_list_are_refused(tmp_path, cli):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": NotAllowed()}, tmp_path / "evil.pth")
    result = cli("convert", "resnet50-ssl", tmp_path / "evil.pth", "--out", tmp_path / "repo")
    assert result.code == 1
    assert "NotAllowed, outside medhub's allow-list" in result.err


def test_unreadable_checkpoint(tmp_path, cli):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    result = cli("convert", "resnet50-ssl", tmp_path / "junk.pth", "--out", tmp_path / "repo")
    assert result.code == 1 and "junk.pth is not a readable PyTorch file" in result.err
