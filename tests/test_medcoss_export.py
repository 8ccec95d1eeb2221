"""MedCoSS repos: export, publish to the cache and load by id offline, with and without medhub."""

import json

import pytest
from huggingface_hub import ModelCard

from hub.export import verify_repo

CHECK_GOLDEN = """
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSemanticSegmentation
model = AutoModel.from_pretrained("{repo_id}"{extra}).eval()
golden = load_file(snapshot_download("{repo_id}") + "/golden.safetensors")
with torch.no_grad():
    out = model(pixel_values=golden["pixel_values"]).pooler_output
assert torch.allclose(out, golden["expected.pooler_output"], atol=1e-5), (out - golden["expected.pooler_output"]).abs().max()
volume = model(pixel_values=torch.zeros(1, 1, 16, 32, 32)).last_hidden_state.shape
print(type(model).__module__, tuple(golden["pixel_values"].shape), tuple(volume))
if {with_head}:
    print(type(AutoModelForSemanticSegmentation.from_pretrained("{repo_id}"{extra})).__name__)
"""


def publish_and_load(variant, repo_id, tmp_path, hf_cache, cli, run_python, with_head):
    repo = tmp_path / "repo"
    result = cli("init", variant, "--out", repo, "--repo-id", repo_id)
    assert result.code == 0, result.err
    assert cli("publish", repo, "--repo-id", repo_id, "--cache").code == 0
    assert verify_repo(repo_id).golden_max_abs_diff == 0
    with_medhub = run_python("import hub\n" + CHECK_GOLDEN.format(repo_id=repo_id, extra="", with_head=with_head))
    assert with_medhub.returncode == 0, with_medhub.stderr
    blocked = "import sys\nsys.modules['hub'] = None\n" + CHECK_GOLDEN.format(
        repo_id=repo_id, extra=", trust_remote_code=True", with_head=with_head
    )
    without_medhub = run_python(blocked, env={"HF_MODULES_CACHE": str(hf_cache.parent / "modules")})
    assert without_medhub.returncode == 0, without_medhub.stderr
    return repo, with_medhub.stdout.split(), without_medhub.stdout.split()


@pytest.mark.slow
def test_tiny_repo_loads_by_id_offline_with_and_without_medhub(tmp_path, hf_cache, cli, run_python):
    repo, with_medhub, without_medhub = publish_and_load("medcoss-tiny", "org/medcoss-tiny", tmp_path, hf_cache, cli, run_python, True)
    assert with_medhub[0] == "hub.models.medcoss.modeling_medcoss"
    assert without_medhub[0].startswith("transformers_modules.")
    assert with_medhub[1:] == without_medhub[1:] == ["(1,", "3,", "32,", "32)", "(1,", "5,", "32)", "MedCossForSemanticSegmentation"]
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_medcoss.MedCossForPreTraining"
    assert config["image_pooling"] == "patch_mean" and config["text_pooling"] == "mean"
    processor = json.loads((repo / "preprocessor_config.json").read_text())
    assert processor["size"] == [32, 32] and processor["resize"] == [32, 32] and processor["intensity"]["policy"] == "scale01"
    card = ModelCard.load(repo / "README.md")
    assert card.data.license == "apache-2.0" and {"medcoss", "xray"} <= set(card.data.tags)
    for section in ("## Intended use", "not a medical device", "## Training data", "## Preprocessing", "## How to load",
                    "trust_remote_code=True", "## Limitations", "## Citation", 'AutoModel.from_pretrained("org/medcoss-tiny")'):
        assert section in card.text, section


@pytest.mark.slow
def test_paper_scale_repo_loads_by_id_offline_with_and_without_medhub(tmp_path, hf_cache, cli, run_python):
    _, with_medhub, without_medhub = publish_and_load("medcoss-vitb", "org/medcoss-vitb", tmp_path, hf_cache, cli, run_python, False)
    assert with_medhub[1:] == without_medhub[1:] == ["(1,", "3,", "224,", "224)", "(1,", "5,", "768)"]
