"""MedCoSS repos: export, publish to the cache and load by id offline, with and without medhub."""

import json

import pytest
from conftest import CARD_SECTIONS
from huggingface_hub import ModelCard

from hub.export import verify_repo

VOLUME = '    print("volume", tuple(model(pixel_values=torch.zeros(1, 1, 16, 32, 32)).last_hidden_state.shape))'
VOLUME_AND_HEAD = """
    volume = model(pixel_values=torch.zeros(1, 1, 16, 32, 32)).last_hidden_state.shape
    print("volume", tuple(volume))
    head = AutoModelForSemanticSegmentation.from_pretrained(repo_id, trust_remote_code=remote)
    print("head", type(head).__name__)
"""


@pytest.mark.slow
def test_tiny_repo_loads_by_id_offline_with_and_without_medhub(tmp_path, load_by_id):
    with_medhub, without_medhub = load_by_id(["medcoss-tiny"], per_model=VOLUME_AND_HEAD)
    assert with_medhub.split()[1] == "hub.models.medcoss.modeling_medcoss"
    assert without_medhub.split()[1].startswith("transformers_modules.")
    expected_rest = ["(1,", "3,", "32,", "32)", "volume", "(1,", "5,", "32)", "head", "MedCossForSemanticSegmentation"]
    assert with_medhub.split()[2:] == without_medhub.split()[2:] == expected_rest
    repo = tmp_path / "medcoss-tiny"
    assert verify_repo("org/medcoss-tiny").golden_max_abs_diff == 0
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_medcoss.MedCossForPreTraining"
    assert config["image_pooling"] == "patch_mean" and config["text_pooling"] == "mean"
    processor = json.loads((repo / "preprocessor_config.json").read_text())
    assert (
        processor["size"] == [32, 32]
        and processor["resize"] == [32, 32]
        and processor["intensity"]["policy"] == "scale01"
    )
    card = ModelCard.load(repo / "README.md")
    assert card.data.license == "apache-2.0" and {"medcoss", "xray"} <= set(card.data.tags)
    for section in (*CARD_SECTIONS, 'AutoModel.from_pretrained("org/medcoss-tiny")'):
        assert section in card.text, section


@pytest.mark.slow
def test_paper_scale_repo_loads_by_id_offline_with_and_without_medhub(load_by_id):
    with_medhub, without_medhub = load_by_id(["medcoss-vitb"], per_model=VOLUME)
    assert (
        with_medhub.split()[2:]
        == without_medhub.split()[2:]
        == ["(1,", "3,", "224,", "224)", "volume", "(1,", "5,", "768)"]
    )
