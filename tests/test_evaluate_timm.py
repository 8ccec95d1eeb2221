"""`timm:<name>[=FILE]` study backbones: a tiny timm ResNet saved to a file is converted into a `muscle` repo whose
pooled features are timm's and runs in a linear study; without local weights, one error line names the file
expected; architectures other than a torchvision-layout ResNet are refused."""

import dataclasses

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import BasicBlock, ResNet
from training_fixtures import write_config, xray_manifest
from transformers import AutoModel

from hub.data.manifest import load_manifest, write_manifest
from training.errors import TrainingConfigError
from training.evaluate.imagenet import timm_checkpoint
from training.evaluate.runner import run_study
from training.evaluate.study import load_study
from training.evaluate.units import backbone_repo

TINY = "medhub_test_tiny_resnet"


def medhub_test_tiny_resnet(pretrained: bool = False, **kwargs) -> ResNet:
    """timm's ResNet class with one basic block per stage and narrow stages (timm's plain stem is 64 wide)."""
    return build_model_with_cfg(
        ResNet, TINY, pretrained, block=BasicBlock, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), **kwargs
    )


if not timm.is_model(TINY):
    register_model(medhub_test_tiny_resnet)


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(5)
    network = timm.create_model(TINY).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong mapping shows in the features
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "tiny.safetensors"
    save_file(network.state_dict(), path)
    return network, path


def test_timm_backbone_from_a_file_has_timms_features_and_is_written_once(tiny_weights, tmp_path):
    network, path = tiny_weights
    repo = backbone_repo(f"timm:{TINY}={path}", tmp_path / "backbones")
    assert repo == tmp_path / "backbones" / f"timm-{TINY}"
    model = AutoModel.from_pretrained(repo).eval()
    assert (model.config.depths, model.config.hidden_sizes, model.config.block_type) == (
        [1] * 4,
        [8, 16, 32, 64],
        "basic",
    )
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        expected = network.forward_head(network.forward_features(x), pre_logits=True)
        assert torch.allclose(model(pixel_values=x).pooler_output.flatten(1), expected, atol=1e-5)
    modified = repo.stat().st_mtime_ns
    assert backbone_repo(f"timm:{TINY}={path}", tmp_path / "backbones") == repo and repo.stat().st_mtime_ns == modified


@pytest.mark.slow
def test_timm_backbone_runs_in_a_linear_study(tiny_weights, tmp_path):
    _, path = tiny_weights
    rows = load_manifest(xray_manifest(tmp_path / "phantoms", n_xray=12))
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    write_manifest([dataclasses.replace(r, split=s) for r, s in zip(rows, splits)], tmp_path / "phantoms" / "t.jsonl")
    study = {
        "backbones": {"random": "random:muscle-resnet18-tiny", "timm": f"timm:{TINY}={path}"},
        "baseline": "random",
        "tasks": {"nodule": {"manifest": "phantoms/t.jsonl", "label": "nodule"}},
        "protocols": ["linear"],
        "runs": 2,
    }
    results = run_study(load_study(write_config(tmp_path / "study.yaml", study)), tmp_path / "out", progress=False)
    timm_rows = [row for row in results if row["backbone"] == "timm"]
    assert len(results) == 4 and len(timm_rows) == 2
    assert all(0.0 <= row["metrics"]["roc_auc"] <= 1.0 and row["n_test"] == 4 for row in timm_rows)


def test_timm_backbone_without_local_weights_is_one_clear_error(tmp_path, hf_cache, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = hf_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / "*" / "model.safetensors"
    with pytest.raises(TrainingConfigError) as error:
        backbone_repo("timm:resnet18", tmp_path / "backbones")
    message = str(error.value)
    assert f"no timm weights (offline) at {expected};" in message and "timm:resnet18=FILE" in message
    assert "\n" not in message and not (tmp_path / "backbones").exists()
    with pytest.raises(TrainingConfigError, match="no timm weights file at /nowhere/w.pth"):
        backbone_repo("timm:resnet18=/nowhere/w.pth", tmp_path / "backbones")
    with pytest.raises(TrainingConfigError, match="has no model named 'no_such_net'"):
        backbone_repo("timm:no_such_net", tmp_path / "backbones")
    with pytest.raises(TrainingConfigError, match="names no pretrained weights"):
        backbone_repo(f"timm:{TINY}", tmp_path / "backbones")


def test_timm_weights_are_found_in_the_hugging_face_cache(hf_cache):
    snapshot = hf_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (hf_cache / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (hf_cache / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    assert timm_checkpoint("timm:resnet18") == snapshot / "model.safetensors"


def test_timm_backbones_other_than_resnets_are_refused(tiny_weights, tmp_path):
    for name in ("test_vit", "test_resnet"):  # a ViT, and a ResNet with a deep (3-conv) stem
        path = tmp_path / f"{name}.safetensors"
        save_file(timm.create_model(name).state_dict(), path)
        with pytest.raises(TrainingConfigError, match="converts timm ResNets with torchvision's layout"):
            backbone_repo(f"timm:{name}={path}", tmp_path / "backbones")
    with pytest.raises(TrainingConfigError, match="does not hold timm test_vit weights"):
        backbone_repo(f"timm:test_vit={tiny_weights[1]}", tmp_path / "backbones")
