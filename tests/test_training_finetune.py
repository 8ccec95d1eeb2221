"""`medhub finetune`: classification and 2D/3D segmentation task repos from the phantoms, the frozen encoder,
the metrics written into the card's model-index, and the errors raised before any training."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from training_fixtures import write_config
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

from hub.data.manifest import load_manifest, write_manifest
from hub.data.phantoms import generate
from hub.export import verify_repo
from hub.models.macl import MaclModel
from hub.models.muscle import MuscleModel
from training.errors import TrainingConfigError
from training.finetune import (
    TaskSpec,
    classification_metrics,
    default_task,
    dice_scores,
    epoch_batches,
    finetune,
    load_head_model,
    parse_mask_map,
    soft_dice_loss,
)

# three epochs at tiny batch sizes: enough to exercise validation, early-stop bookkeeping and export
QUICK = {"progress": False, "classification": {"epochs": 3}, "segmentation": {"epochs": 3}}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """12 X-rays (every third one in `val`: two with a nodule, two without) and 4 CT volumes (2 train, 1 val)."""
    folder = tmp_path_factory.mktemp("finetune-phantoms")
    generate(folder, seed=0, n_xray=12, n_ct=4, n_mri=0, n_pathology=0, progress=False)
    rows = load_manifest(folder / "manifest.jsonl")
    xray = iter(range(12))
    rows = [
        dataclasses.replace(row, split="val" if next(xray) % 3 == 2 else "train") if row.modality == "xray" else row
        for row in rows
    ]
    return write_manifest(rows, folder / "finetune.jsonl")


@pytest.fixture(scope="module")
def repos(tmp_path_factory, phantoms):
    """Randomly initialised encoder repos of the tiny MUSCLE and 3D MACL variants, and a quick config file."""
    from hub.cli.main import main

    folder = tmp_path_factory.mktemp("finetune-repos")
    for variant in ("muscle-resnet18-tiny", "macl-unet3d-tiny"):
        assert main(["init", variant, "--out", str(folder / variant)]) == 0
    return {
        "muscle": folder / "muscle-resnet18-tiny",
        "macl3d": folder / "macl-unet3d-tiny",
        "quick": write_config(folder / "quick.yaml", QUICK),
    }


def _model_index(repo_dir):
    (entry,) = ModelCard.load(repo_dir / "README.md").data.eval_results
    return entry


def _best(run_dir, metric):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = min(records, key=lambda r: r["val_loss"])
    return best[metric]


@pytest.mark.slow
def test_classification_finetune_of_a_muscle_repo_writes_labels_and_validation_auc(repos, phantoms, tmp_path, cli):
    run = tmp_path / "run"
    result = cli(
        "finetune",
        repos["muscle"],
        "--task",
        "classification",
        "--data",
        phantoms,
        "--out",
        run,
        "--config",
        repos["quick"],
        "--repo-id",
        "demo/nodule",
    )
    assert result.code == 0, result.err
    assert f"exported {run / 'repo'}" in result.out
    verify_repo(run / "repo")
    model = AutoModelForImageClassification.from_pretrained(run / "repo")
    assert model.config.id2label == {0: "no nodule", 1: "nodule"}
    assert model.config.architectures == ["MuscleForImageClassification"]
    results = ModelCard.load(run / "repo" / "README.md").data.eval_results
    assert {r.metric_type for r in results} == {"roc_auc", "accuracy"}
    for entry in results:
        assert entry.task_type == "image-classification" and entry.dataset_split == "val"
        assert entry.metric_value == pytest.approx(_best(run, entry.metric_type))
    assert "| image-classification | finetune (val split) | roc_auc |" in (run / "repo" / "README.md").read_text()


@pytest.mark.slow
def test_frozen_segmentation_finetune_leaves_the_encoder_exactly_unchanged(repos, phantoms, tmp_path):
    task = TaskSpec("segmentation", ("background", "lung", "nodule"))
    result = finetune(repos["muscle"], task, phantoms, tmp_path / "run", config_file=repos["quick"], freeze=True)
    verify_repo(result.repo_dir)
    before = MuscleModel.from_pretrained(repos["muscle"]).state_dict()
    after = MuscleModel.from_pretrained(result.repo_dir).state_dict()
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # weights and BN statistics
    trained = AutoModelForSemanticSegmentation.from_pretrained(result.repo_dir).state_dict()
    initial = load_head_model(repos["muscle"], task, seed=0).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.startswith("decode_head"))
    entry = _model_index(result.repo_dir)
    assert (entry.task_type, entry.metric_type) == ("image-segmentation", "dice")
    assert entry.metric_value == pytest.approx(result.metrics["dice"]) and 0.0 <= entry.metric_value <= 1.0


@pytest.mark.slow
def test_full_finetune_changes_the_encoder(repos, phantoms, tmp_path):
    task = TaskSpec("classification", ("no nodule", "nodule"), label="nodule")
    result = finetune(repos["muscle"], task, phantoms, tmp_path / "run", config_file=repos["quick"])
    before = MuscleModel.from_pretrained(repos["muscle"]).state_dict()
    after = MuscleModel.from_pretrained(result.repo_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_3d_liver_segmentation_finetune_of_macl_unet3d_tiny_on_ct(repos, phantoms, tmp_path, cli):
    run = tmp_path / "run"
    result = cli(
        "finetune",
        repos["macl3d"],
        "--task",
        "segmentation",
        "--classes",
        "background",
        "liver",
        "--mask-map",
        "1=0",
        "2=1",
        "3=1",
        "--data",
        phantoms,
        "--out",
        run,
        "--config",
        repos["quick"],
    )
    assert result.code == 0, result.err
    verify_repo(run / "repo")
    config = json.loads((run / "repo" / "config.json").read_text())
    assert config["architectures"] == ["MaclForSemanticSegmentation"] and config["spatial_dims"] == 3
    assert config["id2label"] == {"0": "background", "1": "liver"}
    entry = _model_index(run / "repo")
    assert entry.metric_type == "dice" and entry.metric_value == pytest.approx(_best(run, "dice"))
    encoder = MaclModel.from_pretrained(run / "repo")
    assert encoder(torch.zeros(1, 1, 32, 32, 32)).pooler_output.shape == (1, encoder.config.hidden_size)


def test_a_family_without_the_head_fails_before_training(repos, phantoms, tmp_path):
    task = TaskSpec("classification", ("no lesion", "lesion"), label="lesion")
    with pytest.raises(TrainingConfigError, match="the macl family has no classification head"):
        finetune(repos["macl3d"], task, phantoms, tmp_path / "run", config_file=repos["quick"])
    assert not (tmp_path / "run").exists()


def test_default_task_picks_the_only_label_and_names_binary_classes(phantoms):
    task = default_task("classification", phantoms, "xray")
    assert (task.label, task.class_names) == ("nodule", ("no nodule", "nodule"))
    with pytest.raises(TrainingConfigError, match="segmentation needs --classes"):
        default_task("segmentation", phantoms, "xray")
    assert default_task("segmentation", phantoms, "ct", class_names=["bg", "liver"], mask_map={2: 1}).mask_map == {2: 1}


def test_a_mask_value_mapped_to_an_unnamed_class_is_refused(repos, phantoms, tmp_path):
    task = TaskSpec("segmentation", ("background", "liver"), mask_map={2: 1, 3: 2})
    with pytest.raises(TrainingConfigError, match="map to class 2 but only 2 classes are named"):
        finetune(repos["macl3d"], task, phantoms, tmp_path / "run", config_file=repos["quick"])


def test_mask_map_entries_are_parsed_and_bad_ones_named():
    assert parse_mask_map(["1=0", "2=1"]) == {1: 0, 2: 1}
    with pytest.raises(Exception, match="'2:1' is not VALUE=CLASS"):
        parse_mask_map(["2:1"])


def test_soft_dice_loss_values():
    labels = torch.tensor([[0, 1], [1, 1]])
    perfect = torch.nn.functional.one_hot(labels, 2).movedim(-1, 0)[None].float() * 100
    assert soft_dice_loss(perfect, labels[None]).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere; class 1 has 3 pixels: (2 * 1.5 + 1) / (2 + 3 + 1)
    assert soft_dice_loss(uniform, labels[None]).item() == pytest.approx(1 - 4 / 6)


def test_dice_and_classification_metrics_values():
    # class 1: 3 hits, 4 predicted, 5 true -> 6/9; class 2 absent everywhere -> not averaged
    counts = np.array([[10, 3, 0], [12, 4, 0], [11, 5, 0]], dtype=float)
    assert dice_scores(counts) == pytest.approx({"dice": 6 / 9, "dice_class_1": 6 / 9})
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    metrics = classification_metrics(probabilities, np.array([0, 1, 0, 1]))
    assert metrics == pytest.approx({"accuracy": 0.5, "roc_auc": 0.75})
    assert "roc_auc" not in classification_metrics(probabilities[:2], np.array([0, 0]))


def test_epoch_batches_cover_every_index_once_and_never_end_with_a_single_sample():
    batches = epoch_batches(9, 4, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(9)) and [len(b) for b in batches] == [4, 5]
    assert epoch_batches(5, 2, None) == [[0, 1], [2, 3, 4]]
