"""The repo format: files, metadata, card, checksums, golden output, cache publishing and loading by id."""

import json

import pytest
import torch
from conftest import CARD_SECTIONS
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from hub.catalogue import get_variant
from hub.errors import RepoError
from hub.export import Provenance, export_repo, install_in_cache, verify_repo, weights_metadata, write_checksums
from hub.models.muscle import MuscleForImageClassification, MuscleModel

REPO_FILES = {
    "README.md",
    "checksums.sha256",
    "config.json",
    "configuration_muscle.py",
    "golden.safetensors",
    "image_processing_medhub.py",
    "model.safetensors",
    "modeling_muscle.py",
    "preprocessor_config.json",
}


@pytest.fixture
def tiny_repo(tmp_path, cli):
    result = cli("init", "muscle-resnet18-tiny", "--out", tmp_path / "repo", "--repo-id", "org/muscle-tiny")
    assert result.code == 0, result.err
    return tmp_path / "repo"


def test_init_writes_every_repo_file(tiny_repo):
    assert {p.name for p in tiny_repo.iterdir()} == REPO_FILES
    config = json.loads((tiny_repo / "config.json").read_text())
    assert config["model_type"] == "muscle" and config["pooling"] == "mean"
    assert config["auto_map"]["AutoModel"] == "modeling_muscle.MuscleModel"
    assert config["auto_map"]["AutoModelForObjectDetection"] == "modeling_muscle.MuscleForObjectDetection"
    metadata = weights_metadata(tiny_repo / "model.safetensors")
    assert metadata["family"] == "muscle" and metadata["variant"] == "muscle-resnet18-tiny"
    assert json.loads(metadata["source"])["details"] == {"seed": "0"}
    assert metadata["medhub_version"]
    processor = json.loads((tiny_repo / "preprocessor_config.json").read_text())
    assert processor["modality"] == "xray" and processor["size"] == [64, 64]


def test_repo_files_are_readable_by_everyone(tiny_repo, hf_cache, cli):
    """Repos are shared: 0644 for every file, weights and golden included (safetensors writes 0600)."""
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tiny_repo.iterdir()} == {n: "0o644" for n in REPO_FILES}
    assert cli("publish", str(tiny_repo), "--repo-id", "org/muscle-tiny", "--cache").code == 0
    blobs = [p for p in hf_cache.rglob("blobs/*") if p.is_file()]
    assert len(blobs) == len(REPO_FILES) and all(p.stat().st_mode & 0o777 == 0o644 for p in blobs)


def test_card_parses_with_model_card_and_has_the_contract(tiny_repo):
    card = ModelCard.load(tiny_repo / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.library_name == "medhub"
    assert {"medical", "xray", "muscle"} <= set(card.data.tags)
    for section in CARD_SECTIONS:
        assert section in card.text, section
    assert 'AutoModel.from_pretrained("org/muscle-tiny")' in card.text


def test_card_carries_model_index_and_base_model_when_given(tmp_path, tiny_config):
    variant = get_variant("muscle-resnet18-tiny")
    provenance = Provenance(
        kind="converted", description="converted", license="cc-by-nc-4.0", base_model="facebook/moco-v2"
    )
    results = [
        {
            "task_type": "image-classification",
            "dataset_name": "Phantom CXR",
            "dataset_type": "phantom-cxr",
            "metric_type": "roc_auc",
            "metric_value": 0.875,
        }
    ]
    export_repo(
        MuscleModel(tiny_config),
        tmp_path / "r",
        variant=variant.id,
        provenance=provenance,
        processor=variant.build_processor(),
        modality="xray",
        eval_results=results,
    )
    card = ModelCard.load(tmp_path / "r" / "README.md")
    assert card.data.base_model == "facebook/moco-v2" and card.data.license == "cc-by-nc-4.0"
    assert card.data.eval_results[0].metric_value == 0.875
    assert "| image-classification | Phantom CXR | roc_auc | 0.875 |" in card.text


def test_head_model_exports_with_encoder_golden(tmp_path, tiny_config):
    tiny_config.num_labels = 3
    variant = get_variant("muscle-resnet18-tiny")
    model = MuscleForImageClassification(tiny_config)
    export_repo(
        model,
        tmp_path / "r",
        variant=variant.id,
        provenance=Provenance("trained", "test"),
        processor=variant.build_processor(),
        modality="xray",
    )
    golden = load_file(tmp_path / "r" / "golden.safetensors")
    with torch.no_grad():
        expected = model.muscle.eval()(golden["pixel_values"]).pooler_output
    assert torch.equal(golden["expected.pooler_output"], expected)
    assert verify_repo(tmp_path / "r").files_checked == 8


def test_verify_passes_then_catches_one_flipped_byte(tiny_repo, cli):
    assert cli("verify", tiny_repo).code == 0
    weights = tiny_repo / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    result = cli("verify", tiny_repo)
    assert result.code == 1
    assert "model.safetensors" in result.err and "sha256" in result.err


def test_verify_catches_changed_weights_even_with_fresh_checksums(tiny_repo):
    weights = tiny_repo / "model.safetensors"
    tensors = load_file(weights)
    tensors["layer4.0.conv2.weight"] = tensors["layer4.0.conv2.weight"] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    write_checksums(tiny_repo)
    with pytest.raises(RepoError, match="golden output .* differs"):
        verify_repo(tiny_repo)


def test_publish_twice_keeps_old_revision_loadable(tiny_repo, hf_cache):
    first = install_in_cache(tiny_repo, "org/muscle-tiny")
    second = install_in_cache(tiny_repo, "org/muscle-tiny")
    assert first.commit != second.commit and len(second.commit) == 40
    root = hf_cache / "models--org--muscle-tiny"
    assert (root / "refs" / "main").read_text() == second.commit
    assert (root / "snapshots" / first.commit / "model.safetensors").resolve().parent.name == "blobs"
    old = AutoModel.from_pretrained("org/muscle-tiny", revision=first.commit)
    assert isinstance(old, MuscleModel)
    assert verify_repo("org/muscle-tiny").repo_dir.name == second.commit


def test_publish_respects_cache_dir_option(tiny_repo, tmp_path, cli):
    result = cli("publish", tiny_repo, "--repo-id", "org/x", "--cache", "--cache-dir", tmp_path / "elsewhere")
    assert result.code == 0, result.err
    assert (tmp_path / "elsewhere" / "models--org--x" / "refs" / "main").is_file()


def test_publish_dry_run_lists_files_and_writes_nothing(tiny_repo, hf_cache, cli):
    result = cli("publish", tiny_repo, "--repo-id", "org/x", "--hub", "--dry-run")
    assert result.code == 0
    assert "model.safetensors" in result.out and "checksums.sha256" in result.out
    assert not hf_cache.exists()


def test_publish_to_hub_creates_repo_and_uploads_folder(tiny_repo, monkeypatch, cli):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def create_branch(self, repo_id, branch, exist_ok):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, repo_id, folder_path, revision, commit_message):
            calls.append(("upload_folder", repo_id, folder_path, revision))

            class Info:
                oid, commit_url = "a" * 40, f"https://hub.example/{repo_id}/commit/{'a' * 40}"

            return Info()

    monkeypatch.setattr("hub.export.publish.HfApi", FakeApi)
    result = cli("publish", tiny_repo, "--repo-id", "org/x", "--hub", "--revision", "v1", "--private", "--token", "t")
    assert result.code == 0, result.err
    assert calls == [
        ("init", "t"),
        ("create_repo", "org/x", True, True),
        ("create_branch", "org/x", "v1"),
        ("upload_folder", "org/x", str(tiny_repo), "v1"),
    ]


@pytest.mark.slow
def test_published_repo_loads_by_id_offline_with_and_without_medhub(load_by_id):
    """The issue's acceptance line, at paper scale: init muscle-resnet18, publish to the cache, load by id."""
    with_medhub, without_medhub = load_by_id(["muscle-resnet18"])
    assert with_medhub.split()[1] == "hub.models.muscle.modeling_muscle"
    assert without_medhub.split()[1].startswith("transformers_modules.")
