"""The MUSCLE recipe: MoCo's EMA and queue, L2-SP, the task schedule, task/manifest validation, the CLI run."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from training_fixtures import MICRO_MUSCLE, write_config, xray_manifest
from transformers import AutoModelForImageClassification

from hub.catalogue import get_variant
from hub.data.manifest import load_manifest, write_manifest
from hub.export import verify_repo
from hub.models import FAMILIES
from hub.models.muscle import MuscleModel
from training.config import AugmentSettings, load_recipe_config
from training.continual import l2sp_penalty, task_order
from training.data import ManifestDataset, Target, augment, boxes_to_grid, mask_to_grid, read_split, sample_generator
from training.distributed import DistInfo
from training.errors import TrainingConfigError
from training.moco import Moco, enqueue, info_nce
from training.recipes.muscle import ContinualStage, MuscleRecipe, MuscleSettings

CPU = DistInfo(0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return xray_manifest(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture
def micro(tmp_path):
    return load_recipe_config(MuscleSettings, "muscle", "tiny", write_config(tmp_path / "m.yaml", MICRO_MUSCLE))


def test_key_encoder_is_the_exact_ema_of_the_query_encoder_after_k_steps(tiny_config):
    torch.manual_seed(0)
    moco = Moco(MuscleModel(tiny_config), 64, 32, 16, queue_size=8, momentum=0.9, temperature=0.2)
    expected = [p.detach().clone() for p in moco.key_parameters()]
    assert all(torch.equal(k, q) for k, q in zip(expected, moco.query_parameters()))
    for _ in range(5):
        with torch.no_grad():
            for parameter in moco.query_parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)  # what an optimiser step does
        moco.momentum_update()
        expected = [k * 0.9 + q.detach() * (1 - 0.9) for k, q in zip(expected, moco.query_parameters())]
    assert all(torch.equal(k, e) for k, e in zip(moco.key_parameters(), expected))
    assert not any(p.requires_grad for p in moco.key_parameters())


def test_queue_keeps_the_newest_keys_and_wraps_around():
    queue, pointer = torch.zeros(2, 5), torch.zeros((), dtype=torch.long)
    batches = [torch.full((3, 2), float(i)) for i in (1, 2, 3)]
    for batch in batches:
        enqueue(queue, pointer, batch)
    # 9 keys into 5 slots: batch 1 wrote 0-2, batch 2 wrote 3,4,0, batch 3 wrote 1,2,3
    assert queue[0].tolist() == [2.0, 3.0, 3.0, 3.0, 2.0] and int(pointer) == 4
    keys = torch.arange(14, dtype=torch.float32).view(7, 2)
    enqueue(queue, pointer, keys)  # more keys than slots: the newest 5, continuing from the pointer
    assert sorted(queue[0].tolist()) == keys[2:, 0].tolist() and int(pointer) == (4 + 7) % 5
    assert queue[:, (4 + 2) % 5].tolist() == keys[2].tolist() and queue[:, (4 + 6) % 5].tolist() == keys[6].tolist()


def test_info_nce_is_cross_entropy_of_the_positive_among_queue_negatives():
    query = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(8, 6), dim=0)
    loss = info_nce(query, query, queue, temperature=0.5)
    logits = torch.cat([torch.ones(4, 1), query @ queue], dim=1) / 0.5
    assert loss.item() == pytest.approx(-torch.log_softmax(logits, 1)[:, 0].mean().item(), rel=1e-6)


def test_l2sp_is_zero_at_the_anchor_and_its_gradient_is_alpha_times_the_drift():
    anchor = [torch.randn(3, 4), torch.randn(5)]
    backbone = [torch.nn.Parameter(a.clone()) for a in anchor]
    head = [torch.nn.Parameter(torch.randn(2, 3))]
    assert l2sp_penalty(backbone, anchor, [], alpha=0.3, beta=0.2).item() == 0.0
    with torch.no_grad():
        for parameter in backbone:
            parameter.add_(torch.randn_like(parameter))
    penalty = l2sp_penalty(backbone, anchor, head, alpha=0.3, beta=0.2)
    penalty.backward()
    for parameter, start in zip(backbone, anchor):
        torch.testing.assert_close(parameter.grad, 0.3 * (parameter.detach() - start))
    torch.testing.assert_close(head[0].grad, 0.2 * head[0].detach())
    drift = sum(((p - a) ** 2).sum() for p, a in zip(backbone, anchor))
    assert penalty.item() == pytest.approx((0.15 * drift + 0.1 * (head[0] ** 2).sum()).item(), rel=1e-6)


def test_task_order_is_the_documented_seeded_permutation_and_the_stage_follows_it(micro, manifest):
    for round_index in range(4):
        expected = torch.randperm(3, generator=torch.Generator().manual_seed(7 + round_index)).tolist()
        assert task_order(3, round_index, seed=7, reshuffle=True) == expected
    assert {tuple(task_order(4, r, 0, True)) for r in range(10)} != {(0, 1, 2, 3)}
    assert task_order(3, 5, seed=7, reshuffle=False) == [0, 1, 2]
    recipe = MuscleRecipe(micro, [manifest], CPU)
    moco, stage = recipe.stages()
    assert not moco.sync_bn and stage.sync_bn  # shuffled BatchNorm stays per rank; the supervised stage syncs
    assert isinstance(stage, ContinualStage) and stage.num_steps == 2 * 2 * 2
    visits = [stage.position(step)[:2] for step in range(0, stage.num_steps, 2)]
    assert visits == [(task_order(2, r, 0, True)[slot], r) for r in range(2) for slot in range(2)]


def test_heads_share_one_encoder_and_are_kept_across_rounds(micro, manifest):
    recipe = MuscleRecipe(micro, [manifest], CPU)
    heads = recipe.network.heads
    assert heads["nodule"].muscle is recipe.encoder is heads["lungs"].muscle is recipe.network.moco.encoder_q
    assert heads["nodule"].config.id2label == {0: "no nodule", 1: "nodule"}
    assert heads["lungs"].config.num_labels == 3


def test_a_task_the_family_has_no_head_for_fails_before_training(micro, manifest, monkeypatch):
    micro.continual.tasks[1].kind = "keypoints"
    with pytest.raises(TrainingConfigError, match="kind 'keypoints' is not one of"):
        MuscleRecipe(micro, [manifest], CPU)
    micro.continual.tasks[1].kind = "detection"
    muscle = FAMILIES["muscle"]
    classes = {k: v for k, v in muscle.auto_classes.items() if k != "AutoModelForObjectDetection"}
    no_detection = dataclasses.replace(muscle, auto_classes=classes)
    monkeypatch.setitem(FAMILIES, "muscle", no_detection)
    with pytest.raises(TrainingConfigError, match="'lungs': the muscle family has no detection head"):
        MuscleRecipe(micro, [manifest], CPU)


def _rewrite(manifest, tmp_path, change):
    rows = load_manifest(manifest)
    rows = change(rows)
    for row in rows:
        object.__setattr__(row, "path", str(manifest.parent / row.path))
        if row.mask:
            object.__setattr__(row, "mask", str(manifest.parent / row.mask))
    return write_manifest(rows, tmp_path / "bad.jsonl")


def test_a_manifest_with_a_missing_file_names_the_row(manifest, tmp_path, cli):
    def drop_file(rows):
        object.__setattr__(rows[2], "path", "xray/missing.dcm")
        return rows

    bad = _rewrite(manifest, tmp_path, drop_file)
    result = cli("train", "muscle", "--data", bad, "--out", tmp_path / "run")
    assert result.code == 1
    assert "row 3" in result.err and "missing.dcm" in result.err and "Traceback" not in result.err


def test_an_unknown_label_names_the_row(manifest, tmp_path, micro, cli):
    def rename_label(rows):
        object.__setattr__(rows[1], "labels", {"nodules": 1.0})
        return rows

    bad = _rewrite(manifest, tmp_path, rename_label)
    with pytest.raises(TrainingConfigError, match=r"row 2: no label 'nodule' \(row has \['nodules'\]\)"):
        MuscleRecipe(micro, [bad], CPU)
    rows = read_split(manifest, "train", "xray")
    with pytest.raises(TrainingConfigError, match=r"row 2: label 'nodule' = 1.0 is not a class index 0..0 \(x\)"):
        ManifestDataset(
            rows, get_variant("muscle-resnet18-tiny").build_processor(), Target("classification", ("x",), "nodule")
        )
    result = cli("train", "muscle", "--data", bad, "--out", tmp_path / "run")
    assert result.code == 1 and "row 2" in result.err


def test_masks_and_boxes_follow_the_processor_onto_the_model_grid(manifest):
    processor = get_variant("muscle-resnet18-tiny").build_processor()
    rows = read_split(manifest, "train", "xray")
    number, row = rows.rows[1]
    image, mask_path = row.resolve(rows.root)
    record = processor.prepare(image).record
    from hub.io import read_image

    mask = mask_to_grid(read_image(mask_path).array, record)
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 1, 2}
    (box,) = boxes_to_grid(row.boxes, record)
    ys, xs = np.nonzero(mask == 2)
    assert abs(box[0] - xs.min()) <= 1.5 and abs(box[2] - (xs.max() + 1)) <= 1.5
    assert abs(box[1] - ys.min()) <= 1.5 and abs(box[3] - (ys.max() + 1)) <= 1.5


def test_augmentations_move_masks_and_boxes_with_the_image():
    pixels = torch.zeros(3, 8, 8)
    pixels[:, 2:4, 1:3] = 1.0
    item = {"pixel_values": pixels, "labels": (pixels[0] > 0).long()}
    flipped = augment(item, AugmentSettings(flip_prob=1.0, rotate_degrees=0.0), sample_generator(0))
    assert torch.equal(flipped["pixel_values"], pixels.flip(-1)) and torch.equal(
        flipped["labels"], item["labels"].flip(-1)
    )
    rotated = augment(item, AugmentSettings(flip_prob=0.0, rotate_degrees=30.0), sample_generator(1))
    assert not torch.equal(rotated["labels"], item["labels"])
    assert ((rotated["pixel_values"][0] > 0.5).long() - rotated["labels"]).abs().sum() <= 2  # moved together
    boxes = {"pixel_values": pixels, "boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "class_labels": torch.zeros(1)}
    moved = augment(boxes, AugmentSettings(flip_prob=1.0, rotate_degrees=30.0), sample_generator(2))
    assert moved["boxes"].tolist() == [[5.0, 2.0, 7.0, 4.0]]
    assert torch.equal(moved["pixel_values"], pixels.flip(-1))  # no rotation when there are boxes
    volume = {"pixel_values": torch.rand(1, 4, 8, 8), "labels": torch.randint(0, 3, (4, 8, 8))}
    out = augment(volume, AugmentSettings(flip_prob=1.0, rotate_degrees=20.0), sample_generator(3))
    assert out["pixel_values"].shape == (1, 4, 8, 8) and out["labels"].dtype == torch.long
    again = augment(volume, AugmentSettings(flip_prob=1.0, rotate_degrees=20.0), sample_generator(3))
    assert torch.equal(out["pixel_values"], again["pixel_values"])


@pytest.mark.slow
def test_cli_trains_the_tiny_recipe_and_exports_encoder_and_head_repos(manifest, tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", "muscle", "--preset", "tiny", "--data", manifest, "--out", run, "--no-progress")
    assert result.code == 0, result.err
    names = {"encoder", "nodule-classification", "lung-segmentation", "nodule-detection"}
    assert {p.name for p in (run / "repos").iterdir()} == names
    for name in names:
        assert f"exported {run / 'repos' / name}" in result.out
        verify_repo(run / "repos" / name)
    classifier = AutoModelForImageClassification.from_pretrained(run / "repos" / "nodule-classification")
    assert classifier.config.id2label == {0: "no nodule", 1: "nodule"}
    metadata = json.loads((run / "repos" / "encoder" / "config.json").read_text())
    assert metadata["model_type"] == "muscle"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["global_step"] == 6 + 2 * 3 * 2 and {r["stage"] for r in records} == {"moco", "continual"}
    again = cli("train", "muscle", "--data", manifest, "--out", run)
    assert again.code == 1 and "--resume" in again.err
