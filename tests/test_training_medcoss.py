"""The MedCoSS recipe: k-means buffer, distillation, mixup, whole-word masking, bad input, the two-stage run."""

import copy

import pytest
import torch
from training_fixtures import write_config, xray_manifest
from transformers import AutoTokenizer

from hub.catalogue import get_variant
from hub.export import verify_repo
from hub.models.medcoss import MedCossForPreTraining
from training import checkpoint
from training.config import load_recipe_config
from training.distributed import DistInfo
from training.errors import TrainingConfigError
from training.launch import train
from training.recipes.medcoss import MedCossRecipe, MedCossSettings
from training.rehearsal import distillation_loss, image_mixup, kmeans_buffer, teacher_image_tokens, text_mixup
from training.text import encode, train_wordpiece, whole_word_mask

CPU = DistInfo(0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return xray_manifest(tmp_path_factory.mktemp("phantoms"))


def _clusters(seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.arange(10, dtype=torch.float64)[:, None] * torch.tensor([[20.0, -15.0, 10.0]])
    points = centres.repeat_interleave(100, 0) + torch.randn(1000, 3, generator=generator, dtype=torch.float64)
    return points, torch.arange(1000) // 100


def test_kmeans_buffer_is_seeded_about_five_percent_and_nearest_to_the_centres():
    points, truth = _clusters()
    chosen = kmeans_buffer(points, buffer_ratio=0.05, center_ratio=0.01, seed=3)
    assert chosen == kmeans_buffer(points, buffer_ratio=0.05, center_ratio=0.01, seed=3)
    assert len(chosen) == 50  # 10 clusters x 5 nearest
    expected = []
    for cluster in range(10):
        members = torch.nonzero(truth == cluster).flatten()
        distance = (points[members] - points[members].mean(0)).norm(dim=1)
        expected.extend(members[distance.argsort()[:5]].tolist())
    assert chosen == sorted(expected)
    small = kmeans_buffer(points[:300], buffer_ratio=0.05, center_ratio=0.01, seed=0)
    assert len(small) == 15  # 3 clusters x int(15 // 3)


def _student_teacher():
    config = get_variant("medcoss-tiny").build_config(drop_path_rate=0.0, random_temporal_position=False)
    torch.manual_seed(0)
    student = MedCossForPreTraining(config)
    teacher = copy.deepcopy(student.medcoss).requires_grad_(False)
    return student, teacher


def test_distillation_is_zero_for_an_identical_teacher_and_uses_the_same_mask():
    student, teacher = _student_teacher()
    pixels = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 4)
    assert distillation_loss(student, teacher, {"pixel_values": pixels}, noise).item() == 0.0
    kept = student(pixel_values=pixels, noise=noise).last_hidden_state
    assert kept.shape == (3, 1 + 1, 32)  # cls + the one visible patch of 4 at mask ratio 0.75
    assert torch.equal(teacher_image_tokens(teacher, pixels, noise, 0.75), kept)
    assert not torch.equal(teacher_image_tokens(teacher, pixels, 1 - noise, 0.75), kept)  # another mask differs
    text = {"input_ids": torch.randint(5, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    assert distillation_loss(student, teacher, text).item() == 0.0


def test_teacher_gets_no_gradient_and_is_unchanged_by_a_step():
    student, teacher = _student_teacher()
    with torch.no_grad():
        for parameter in student.medcoss.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    loss = distillation_loss(student, teacher, {"pixel_values": torch.randn(2, 3, 32, 32)}, torch.rand(2, 4))
    assert loss.item() > 0
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_image_mixup_has_one_lambda_per_sample_in_the_batch():
    pixels = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    mixed, lambdas, permutation = image_mixup(pixels, torch.Generator().manual_seed(0))
    assert lambdas.shape == (4,) and ((lambdas >= 0) & (lambdas < 1)).all() and len(set(lambdas.tolist())) == 4
    expected = lambdas * torch.arange(4.0) + (1 - lambdas) * permutation.float()
    torch.testing.assert_close(mixed[:, 0, 0, 0], expected)
    assert (mixed == mixed[:, :, :1, :1]).all()  # one lambda for the whole sample


def test_text_mixup_takes_each_token_from_the_sample_or_its_one_partner():
    ids = torch.arange(40).view(4, 10)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[2, 6:] = 0
    mixed, mixed_mask, kept = text_mixup(ids, mask, torch.Generator().manual_seed(1))
    assert 0 < kept.float().mean() < 1
    assert torch.equal(mixed[kept], ids[kept]) and torch.equal(mixed % 10, ids % 10)  # same position
    for row in range(4):
        partners = set((mixed[row][~kept[row]] // 10).tolist())
        assert len(partners) <= 1  # one partner sample per row, from the same (single-modality) batch
        partner = partners.pop() if partners else row
        assert torch.equal(mixed_mask[row], torch.where(kept[row], mask[row], mask[partner]))


def test_whole_word_masking_masks_words_together_with_80_10_10():
    texts = ["pulmonary nodule in the left upper lobe with calcification and effusion"] * 4
    tokenizer = train_wordpiece(texts + ["lungs clear no acute disease"], vocab_size=52)
    encoded = encode(tokenizer, texts[:1], 24)
    ids, words = encoded.input_ids[0], encoded.word_ids[0]
    assert (words >= 0).sum() > len(set(words.tolist()) - {-1})  # some words span several word pieces
    counts = {"mask": 0, "kept": 0, "total": 0}
    for seed in range(300):
        corrupted, labels = whole_word_mask(
            ids, words, tokenizer.mask_token_id, len(tokenizer), torch.Generator().manual_seed(seed)
        )
        chosen = labels != -100
        for word in set(words[chosen].tolist()):
            assert chosen[words == word].all()  # a word is masked whole
        assert not chosen[words < 0].any() and torch.equal(labels[chosen], ids[chosen])
        counts["mask"] += int((corrupted[chosen] == tokenizer.mask_token_id).sum())
        counts["kept"] += int((corrupted[chosen] == ids[chosen]).sum())
        counts["total"] += int(chosen.sum())
    assert counts["total"] / 300 == pytest.approx(0.15 * int((words >= 0).sum()), abs=1.0)
    assert counts["mask"] / counts["total"] == pytest.approx(0.8, abs=0.06)
    assert counts["kept"] / counts["total"] == pytest.approx(0.1, abs=0.06)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rehearsal": {"buffer_ratio": 1.5}}, r"rehearsal.buffer_ratio must be in \(0, 1\), got 1.5"),
        ({"rehearsal": {"center_ratio": 0.0}}, r"rehearsal.center_ratio must be in \(0, 1\)"),
        ({"stages": ["text", "video"]}, "must be distinct modalities"),
        ({"rehearsal": {"enabled": "no"}}, r"rehearsal.enabled must be bool, got 'no'"),
    ],
)
def test_bad_settings_are_named(tmp_path, settings, message):
    with pytest.raises(TrainingConfigError, match=message):
        load_recipe_config(MedCossSettings, "medcoss", "tiny", write_config(tmp_path / "bad.yaml", settings))


def test_a_stage_without_data_or_tokenizer_fails_before_training(tmp_path, manifest):
    settings = load_recipe_config(MedCossSettings, "medcoss", "tiny")
    settings.stages = ["xray", "ct"]
    with pytest.raises(TrainingConfigError, match="stage 'ct' has no data"):
        MedCossRecipe(settings, [manifest], CPU)
    settings.stages, settings.tokenizer = ["text"], str(tmp_path / "no-tokenizer")
    with pytest.raises(TrainingConfigError, match="tokenizer folder .* does not exist"):
        MedCossRecipe(settings, [manifest], CPU)
    settings.tokenizer, settings.tokenizer_vocab_size = None, 5000
    with pytest.raises(TrainingConfigError, match="more than the model's vocab_size 1024"):
        MedCossRecipe(settings, [manifest], CPU)


def test_later_stages_draw_single_modality_batches_from_data_and_buffers(manifest):
    settings = load_recipe_config(MedCossSettings, "medcoss", "tiny")
    recipe = MedCossRecipe(settings, [manifest], CPU)
    stages = recipe.stages()
    stages[1].start()
    assert len(recipe.buffers["text"]) == 1  # 6 reports, 1 centre, int(6 * 0.25) -> at least 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            recipe.network.teacher.state_dict().values(), recipe.network.model.medcoss.state_dict().values()
        )
    )
    draws = [stages[1].draw(step) for step in range(40)]
    assert {d[1] for d in draws} == {"xray", "text"}
    assert all(d[2] == [recipe.buffers["text"][0]] * 4 for d in draws if d[1] == "text")
    assert draws == [stages[1].draw(step) for step in range(40)]


def test_plain_sequential_ablation_builds_no_buffer_and_trains_only_on_the_current_stage(manifest, tmp_path):
    path = write_config(tmp_path / "plain.yaml", {"rehearsal": {"enabled": False}})
    recipe = MedCossRecipe(load_recipe_config(MedCossSettings, "medcoss", "tiny", path), [manifest], CPU)
    stages = recipe.stages()
    stages[1].start()
    assert recipe.buffers == {} and stages[1].sources() == [("xray", list(range(len(recipe.data["xray"]))))]
    assert {stages[1].draw(step)[:2] for step in range(40)} == {(0, "xray")}
    loss, metrics = stages[1].loss(0)
    assert metrics["source"] == 0 and metrics["pretext_loss"] == loss.item() > 0
    assert "no rehearsal" in recipe._provenance().description


@pytest.mark.slow
def test_two_stage_run_exports_a_repo_with_tokenizer_and_resumes_exactly_inside_stage_two(manifest, tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", "medcoss", "--preset", "tiny", "--data", manifest, "--out", run, "--no-progress")
    assert result.code == 0, result.err
    repo = run / "repos" / "medcoss"
    verify_repo(repo)
    tokenizer = AutoTokenizer.from_pretrained(repo)
    assert tokenizer.mask_token == "[MASK]" and len(tokenizer) <= 200
    assert tokenizer("no nodule")["input_ids"][0] == tokenizer.cls_token_id
    final = checkpoint.load(run / "checkpoint.pt")
    assert final["stage_state"]["buffers"]["text"] and final["stage"] == 1
    resumed = tmp_path / "resumed"
    assert not train("medcoss", [manifest], resumed, stop_after=6).completed  # stage 2, step 2
    state = checkpoint.load(resumed / "checkpoint.pt")
    assert state["stage"] == 1 and state["step"] == 2 and state["stage_state"] == final["stage_state"]
    assert train("medcoss", [manifest], resumed, resume=True).completed
    network = checkpoint.load(resumed / "checkpoint.pt")["network"]
    assert [k for k in final["network"] if not torch.equal(final["network"][k], network[k])] == []
