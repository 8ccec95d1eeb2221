"""The MACL recipe: slice positions, views, the three losses on hand-made inputs, the CLI run and exact resume."""

import math

import pytest
import torch
from transformers import AutoModel, AutoModelForSemanticSegmentation

from hub.catalogue import get_variant
from hub.data.phantoms import generate
from hub.export import verify_repo
from hub.models.macl import MaclForPreTraining, MaclPreTrainingOutput
from hub.models.macl.modeling_macl import supcon_loss
from training import checkpoint
from training.config import load_recipe_config
from training.data import read_split, sample_generator
from training.distributed import DistInfo
from training.errors import TrainingConfigError
from training.launch import train
from training.recipes.macl import MaclRecipe, MaclSettings
from training.slices import SliceDataset, ViewSettings, macl_views, min_max, photometric_view, spatial_view
from training_fixtures import write_config

CPU = DistInfo(0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ct"), seed=0, n_xray=0, n_ct=2, n_mri=0, n_pathology=0, progress=False)


@pytest.fixture(scope="module")
def model():
    return MaclForPreTraining(get_variant("macl-tiny").build_config(slice_threshold=0.1))


def _output(first, second, bottleneck=None, dominant=None):
    zeros = torch.zeros(first.shape[0], 2, 1, 1)
    return MaclPreTrainingOutput(
        auxiliary_global=first, dominant_global=second,
        auxiliary_dense=first[..., None, None].expand(-1, -1, 2, 2), dominant_dense=second[..., None, None].expand(-1, -1, 2, 2),
        auxiliary_bottleneck=zeros.expand(-1, -1, 4, 4) if bottleneck is None else bottleneck,
        dominant_bottleneck=zeros if dominant is None else dominant,
    )


def test_global_loss_positives_follow_the_slice_position_threshold(model):
    """Two slices with orthogonal embeddings, each identical in both views: the known SupCon values."""
    embeddings = torch.eye(2)
    normaliser = math.log(math.exp(10.0) + 2.0)  # an anchor's denominator: its other view (sim 1) and two at 0
    factor = 0.1 / 0.07
    far = _output(embeddings, embeddings)
    model._add_losses(far, torch.tensor([0.2, 0.35]))  # |dp| = 0.15 >= 0.1: only the other view is positive
    assert far.loss_global.item() == pytest.approx(factor * (normaliser - 10.0), abs=1e-7)
    near = _output(embeddings, embeddings)
    model._add_losses(near, torch.tensor([0.2, 0.25]))  # |dp| = 0.05 < 0.1: the other slice's two views too
    assert near.loss_global.item() == pytest.approx(factor * (normaliser - 10.0 / 3), rel=1e-5)


def test_identical_embeddings_give_log_of_the_other_views_whatever_the_positives(model):
    same = torch.ones(3, 4)
    for positions in ([0.1, 0.5, 0.9], [0.1, 0.11, 0.12]):
        output = _output(same, same)
        model._add_losses(output, torch.tensor(positions))
        assert output.loss_global.item() == pytest.approx(0.1 / 0.07 * math.log(5), rel=1e-5)


def test_dense_loss_is_the_mean_of_per_location_losses_and_equivariance_is_mean_l1(model):
    torch.manual_seed(0)
    auxiliary, dominant = torch.randn(4, 6, 3, 2), torch.randn(4, 6, 3, 2)
    positions = torch.tensor([0.1, 0.15, 0.6, 0.9])
    output = MaclPreTrainingOutput(
        auxiliary_global=torch.randn(4, 6), dominant_global=torch.randn(4, 6), auxiliary_dense=auxiliary,
        dominant_dense=dominant, auxiliary_bottleneck=torch.full((4, 2, 8, 8), 3.0), dominant_bottleneck=torch.ones(4, 2, 2, 2),
    )
    model._add_losses(output, positions)
    positives = (positions[:, None] - positions[None]).abs() < 0.1
    per_location = [supcon_loss(auxiliary[:, :, y, x], dominant[:, :, y, x], positives, 0.1, 0.07)
                    for y in range(3) for x in range(2)]
    assert output.loss_dense.item() == pytest.approx(torch.stack(per_location).mean().item(), rel=1e-5)
    assert output.loss_equivariance.item() == pytest.approx(2.0)
    expected = output.loss_global + 0.5 * output.loss_dense + 1.0 * output.loss_equivariance
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_slices_carry_their_relative_position(manifest):
    processor = get_variant("macl-tiny").build_processor()
    dataset = SliceDataset(read_split(manifest, "train", "ct"), processor)
    assert len(dataset) == 2 * 32
    assert [dataset[i][1] for i in (0, 15, 31, 32)] == [1 / 32, 16 / 32, 1.0, 1 / 32]
    pixels, _ = dataset[16]
    assert pixels.shape == (1, 64, 64) and abs(float(pixels.mean())) < 1e-4  # the repo's z-scored slice
    xray = generate(manifest.parent / "x", n_xray=2, n_ct=0, n_mri=0, n_pathology=0, progress=False)
    with pytest.raises(TrainingConfigError, match="2D image; slice datasets need volumes"):
        SliceDataset(read_split(xray, "train", "xray"), processor)


def test_views_are_reproducible_and_follow_the_settings():
    torch.manual_seed(0)
    slice_ = torch.rand(1, 32, 32)
    identity = ViewSettings(photometric="identity", spatial_prob=0.0)
    assert torch.equal(photometric_view(slice_, identity, sample_generator(1)), min_max(slice_))
    mirrored = spatial_view(slice_, identity, sample_generator(2))
    assert any(torch.equal(mirrored, slice_.flip(dims)) for dims in ([], [-1], [-2], [-1, -2]))
    code = ViewSettings(elastic_alpha=[5.0, 10.0], elastic_sigma=[2.0, 3.0])
    first = macl_views(slice_, code, [sample_generator(0, v) for v in range(4)])
    again = macl_views(slice_, code, [sample_generator(0, v) for v in range(4)])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], first[1])  # independent photometric draws
    for view in first:
        assert view.shape == slice_.shape and abs(float(view.mean())) < 1e-5 and float(view.std(unbiased=False)) == pytest.approx(1, abs=1e-4)


def test_config_chooses_between_code_and_paper_and_rejects_bad_input(tmp_path, manifest):
    tiny = load_recipe_config(MaclSettings, "macl", "tiny")
    paper = load_recipe_config(MaclSettings, "macl", "paper")
    assert paper.optim.lr == 0.01 and paper.views.photometric == "code" and paper.loss.base_temperature == 0.07
    assert (paper.loss.global_weight, paper.loss.dense_weight, paper.loss.equivariance_weight) == (1.0, 0.5, 1.0)
    assert tiny.variant == "macl-tiny" and tiny.optim.optimizer == "sgd" and tiny.optim.min_lr_ratio == 0.0
    with pytest.raises(TrainingConfigError, match="views.photometric 'blur'"):
        load_recipe_config(MaclSettings, "macl", "tiny", write_config(tmp_path / "b.yaml", {"views": {"photometric": "blur"}}))
    tiny.modality = "xray"
    with pytest.raises(TrainingConfigError, match="not a volume modality"):
        MaclRecipe(tiny, [manifest], CPU)
    tiny.modality, tiny.loss.slice_threshold = "ct", 0.3
    assert MaclRecipe(tiny, [manifest], CPU).network.config.slice_threshold == 0.3


@pytest.mark.slow
def test_cli_trains_exports_a_verifiable_repo_and_resumes_exactly(manifest, tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", "macl", "--preset", "tiny", "--data", manifest, "--out", run, "--no-progress")
    assert result.code == 0, result.err
    repo = run / "repos" / "macl"
    assert f"exported {repo}" in result.out
    verify_repo(repo)
    assert type(AutoModel.from_pretrained(repo)).__name__ == "MaclModel"
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(repo, num_labels=3)
    pretrained = MaclForPreTraining.from_pretrained(repo)
    assert torch.equal(segmenter.decoder.expand_3_1[0].weight, pretrained.decoder.expand_3_1[0].weight)
    assert "released code" in (repo / "README.md").read_text()
    expected = checkpoint.load(run / "checkpoint.pt")["network"]
    resumed = tmp_path / "resumed"
    assert not train("macl", [manifest], resumed, stop_after=3).completed
    assert train("macl", [manifest], resumed, resume=True).completed
    network = checkpoint.load(resumed / "checkpoint.pt")["network"]
    assert [k for k in expected if not torch.equal(expected[k], network[k])] == []
