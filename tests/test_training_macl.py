"""The MACL recipe: slice and sub-volume positions, 2D and 3D views, the three losses on hand-made inputs and in 3D,
the CLI runs (2D with exact resume, 3D) and their repos."""

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from training_fixtures import write_config
from transformers import AutoModel, AutoModelForSemanticSegmentation

from hub.catalogue import get_variant
from hub.data.manifest import ManifestRow, write_manifest
from hub.data.phantoms import ct_volume, generate, write_nifti
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
from training.slices import (
    SliceDataset,
    SubVolumeDataset,
    ViewSettings,
    macl_views,
    min_max,
    photometric_view,
    random_window,
    spatial_view,
)

CPU = DistInfo(0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ct"), seed=0, n_xray=0, n_ct=2, n_mri=0, n_pathology=0, progress=False)


@pytest.fixture(scope="module")
def deep_ct(tmp_path_factory):
    """Two CT phantoms as NIfTI: 70 slices (7 sub-volumes of 64) and 40 slices (one, padded), 48 x 80 in-plane."""
    folder = tmp_path_factory.mktemp("deep-ct")
    rows = []
    for i, depth in enumerate((70, 40)):
        write_nifti(
            ct_volume(np.random.default_rng(i), shape=(depth, 48, 80))["image"],
            folder / f"ct{i}.nii.gz",
            (0.8, 0.8, 2.5),
        )
        rows.append(ManifestRow(f"ct{i}.nii.gz", "ct", "train"))
    return write_manifest(rows, folder / "manifest.jsonl")


@pytest.fixture(scope="module")
def model():
    return MaclForPreTraining(get_variant("macl-tiny").build_config(slice_threshold=0.1))


def _output(first, second, bottleneck=None, dominant=None):
    zeros = torch.zeros(first.shape[0], 2, 1, 1)
    return MaclPreTrainingOutput(
        auxiliary_global=first,
        dominant_global=second,
        auxiliary_dense=first[..., None, None].expand(-1, -1, 2, 2),
        dominant_dense=second[..., None, None].expand(-1, -1, 2, 2),
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
        auxiliary_global=torch.randn(4, 6),
        dominant_global=torch.randn(4, 6),
        auxiliary_dense=auxiliary,
        dominant_dense=dominant,
        auxiliary_bottleneck=torch.full((4, 2, 8, 8), 3.0),
        dominant_bottleneck=torch.ones(4, 2, 2, 2),
    )
    model._add_losses(output, positions)
    positives = (positions[:, None] - positions[None]).abs() < 0.1
    per_location = [
        supcon_loss(auxiliary[:, :, y, x], dominant[:, :, y, x], positives, 0.1, 0.07)
        for y in range(3)
        for x in range(2)
    ]
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


def test_sub_volumes_carry_the_position_of_their_centre_slice(deep_ct, manifest):
    processor = get_variant("macl-unet3d-tiny").build_processor()
    dataset = SubVolumeDataset(read_split(deep_ct, "train", "ct"), processor, depth=64)
    assert len(dataset) == 7 + 1
    expected = [(start + 32 + 1) / 70 for start in range(7)] + [(-12 + 32 + 1) / 40]
    assert dataset.positions == pytest.approx(expected)
    whole = processor.prepare_whole(deep_ct.parent / "ct0.nii.gz").pixel_values  # the repo's z-scored volume
    assert whole.shape == (1, 70, 48, 80) and abs(float(whole.mean())) < 1e-4
    pixels, position = dataset[3]
    assert position == pytest.approx(36 / 70) and torch.equal(pixels, torch.from_numpy(whole[:, 3:67]))
    padded, _ = dataset[7]  # 40 slices centred in 64: 12 empty slices on either end
    assert padded.shape == (1, 64, 48, 80)
    assert not padded[:, :12].any() and not padded[:, 52:].any() and padded[:, 12:52].abs().sum(dim=(0, 2, 3)).all()
    starts = set()
    for seed in range(6):  # height 48 is padded by 8 on either side, width 80 is cut at a random start in 0..16
        window = random_window(pixels, (64, 64), sample_generator(seed))
        assert window.shape == (1, 64, 64, 64) and not window[:, :, :8].any() and not window[:, :, 56:].any()
        starts.add(next(x for x in range(17) if torch.equal(window[:, :, 8:56], pixels[:, :, :, x : x + 64])))
    assert len(starts) > 1
    assert torch.equal(
        random_window(pixels, (64, 64), sample_generator(0)), random_window(pixels, (64, 64), sample_generator(0))
    )
    with pytest.raises(TrainingConfigError, match="need a 3D processor"):
        SubVolumeDataset(read_split(deep_ct, "train", "ct"), get_variant("macl-tiny").build_processor(), depth=64)
    xray = generate(manifest.parent / "x3", n_xray=2, n_ct=0, n_mri=0, n_pathology=0, progress=False)
    with pytest.raises(TrainingConfigError, match="row 1: xray/xray_000.dcm: this model takes 3D input"):
        SubVolumeDataset(read_split(xray, "train", "xray"), processor, depth=64)


def test_3d_views_are_reproducible_blur_in_plane_and_rotate_about_the_slice_axis():
    torch.manual_seed(0)
    volume = torch.rand(1, 16, 16, 16)
    settings = ViewSettings(elastic=False)
    first = macl_views(volume, settings, [sample_generator(0, v) for v in range(4)])
    again = macl_views(volume, settings, [sample_generator(0, v) for v in range(4)])
    other = macl_views(volume, settings, [sample_generator(1, v) for v in range(4)])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.allclose(a, b) for a, b in zip(first, other))
    for view in first:
        assert view.shape == volume.shape and abs(float(view.mean())) < 1e-5
    mirror_only = ViewSettings(photometric="identity", spatial_prob=0.0, elastic=False)
    flips = {tuple(dims) for dims in ([], [-1], [-2], [-3], [-1, -2], [-1, -3], [-2, -3], [-1, -2, -3])}
    seen = {
        next(
            dims
            for dims in flips
            if torch.equal(spatial_view(volume, mirror_only, sample_generator(seed)), volume.flip(dims))
        )
        for seed in range(24)
    }
    assert len(seen) > 2 and any(-3 in dims for dims in seen)  # the slice axis is mirrored too
    one_slice = torch.zeros(1, 16, 16, 16)
    one_slice[:, 8] = torch.rand(16, 16) + 0.5
    blurred = photometric_view(one_slice, ViewSettings(), sample_generator(2))
    others = torch.cat([blurred[:, :8], blurred[:, 9:]], dim=1)
    assert torch.equal(others, others.flatten()[0].expand_as(others))  # nothing leaks across slices
    ramp = torch.arange(16.0).view(1, 16, 1, 1).expand(1, 16, 16, 16).contiguous()  # value = slice index
    across = ramp.transpose(1, 3).contiguous()  # value = column index
    turned = ViewSettings(photometric="identity", spatial_prob=1.0, scale=[1.0, 1.0], elastic=False)
    for seed in range(4):  # every slice turns alike, so each keeps its value (up to a mirror of the slice axis)
        centre = spatial_view(ramp, turned, sample_generator(seed))[0, :, 6:10, 6:10]
        assert any(torch.allclose(centre, ramp[0, :, 6:10, 6:10].flip(dims), atol=1e-4) for dims in ([], [0]))
        assert not any(
            torch.allclose(spatial_view(across, turned, sample_generator(seed)), across.flip(dims), atol=0.1)
            for dims in flips
        )  # while the plane turns
    with pytest.raises(TrainingConfigError, match="views.elastic is 2D only"):
        spatial_view(volume, ViewSettings(spatial_prob=0.0), sample_generator(0))


def test_3d_losses_pair_every_voxel_of_the_dense_maps_and_downsample_trilinearly():
    config = get_variant("macl-unet3d-tiny").build_config()
    network = MaclForPreTraining(config).eval()
    torch.manual_seed(0)
    views = [torch.randn(2, 1, 64, 64, 64) for _ in range(4)]
    positions = torch.tensor([0.2, 0.25])
    with torch.no_grad():
        output = network(*views, slice_positions=positions)
    assert output.auxiliary_dense.shape == output.dominant_dense.shape == (2, 16, 4, 4, 4)
    assert output.auxiliary_bottleneck.shape == (2, 64, 4, 4, 4) and output.dominant_bottleneck.shape == (
        2,
        64,
        1,
        1,
        1,
    )
    positives = (positions[:, None] - positions[None]).abs() < config.slice_threshold
    per_voxel = [
        supcon_loss(output.auxiliary_dense[..., z, y, x], output.dominant_dense[..., z, y, x], positives, 0.1, 0.07)
        for z in range(4)
        for y in range(4)
        for x in range(4)
    ]
    assert output.loss_dense.item() == pytest.approx(torch.stack(per_voxel).mean().item(), rel=1e-5)
    down = F.interpolate(output.auxiliary_bottleneck, scale_factor=0.25, mode="trilinear", align_corners=True)
    assert output.loss_equivariance.item() == pytest.approx(
        (down - output.dominant_bottleneck).abs().mean().item(), rel=1e-6
    )
    global_ = supcon_loss(output.auxiliary_global, output.dominant_global, positives, 0.1, 0.07)
    assert output.loss_global.item() == pytest.approx(global_.item(), rel=1e-6)


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
        assert (
            view.shape == slice_.shape
            and abs(float(view.mean())) < 1e-5
            and float(view.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
        )


def test_config_chooses_between_code_and_paper_and_rejects_bad_input(tmp_path, manifest):
    tiny = load_recipe_config(MaclSettings, "macl", "tiny")
    paper = load_recipe_config(MaclSettings, "macl", "paper")
    assert paper.optim.lr == 0.01 and paper.views.photometric == "code" and paper.loss.base_temperature == 0.07
    assert (paper.loss.global_weight, paper.loss.dense_weight, paper.loss.equivariance_weight) == (1.0, 0.5, 1.0)
    assert tiny.variant == "macl-tiny" and tiny.optim.optimizer == "sgd" and tiny.optim.min_lr_ratio == 0.0
    with pytest.raises(TrainingConfigError, match="views.photometric 'blur'"):
        load_recipe_config(
            MaclSettings, "macl", "tiny", write_config(tmp_path / "b.yaml", {"views": {"photometric": "blur"}})
        )
    tiny.modality = "xray"
    with pytest.raises(TrainingConfigError, match="not a volume modality"):
        MaclRecipe(tiny, [manifest], CPU)
    tiny.modality, tiny.loss.slice_threshold = "ct", 0.3
    assert MaclRecipe(tiny, [manifest], CPU).network.config.slice_threshold == 0.3
    tiny.crop = [64, 64, 64]
    with pytest.raises(TrainingConfigError, match="crop applies to 3D variants only"):
        MaclRecipe(tiny, [manifest], CPU)


def test_the_variant_chooses_3d_sub_volumes_with_a_crop_of_multiples_of_64(tmp_path, deep_ct):
    tiny3d = load_recipe_config(MaclSettings, "macl", "tiny3d")
    paper3d = load_recipe_config(MaclSettings, "macl", "paper3d")
    assert (tiny3d.variant, paper3d.variant) == ("macl-unet3d-tiny", "macl-unet3d")
    assert not tiny3d.views.elastic and not paper3d.views.elastic and tiny3d.crop is None
    recipe = MaclRecipe(tiny3d, [deep_ct], CPU)  # input 32^3, rounded up to the pretraining multiple
    assert recipe.crop == [64, 64, 64] and isinstance(recipe.dataset, SubVolumeDataset) and len(recipe.dataset) == 8
    assert recipe.network.config.spatial_dims == 3 and recipe.processor.size == [32, 32, 32]
    stage = recipe.stages()[0]
    batch = stage.batch(0)
    assert batch["pixel_values"].shape == batch["dominant_spatial_pixel_values"].shape == (2, 1, 64, 64, 64)
    expected = [recipe.dataset.positions[index] for index, _ in stage.stream.batch(0)]
    assert batch["slice_positions"].tolist() == pytest.approx(expected)
    config = write_config(tmp_path / "c.yaml", {"variant": "macl-unet3d-tiny"})
    with pytest.raises(TrainingConfigError, match="set views.elastic: false for 3D variants"):
        MaclRecipe(load_recipe_config(MaclSettings, "macl", "tiny", config), [deep_ct], CPU)
    tiny3d.crop = [32, 64, 64]
    with pytest.raises(
        TrainingConfigError, match=r"crop \[32, 64, 64\] must be 3 sides \(D, H, W\), each a positive multiple of 64"
    ):
        MaclRecipe(tiny3d, [deep_ct], CPU)
    tiny3d.crop, tiny3d.variant = None, "muscle-resnet18-tiny"
    with pytest.raises(TrainingConfigError, match="is not a MACL variant"):
        MaclRecipe(tiny3d, [deep_ct], CPU)


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


@pytest.mark.slow
def test_cli_trains_3d_sub_volumes_and_exports_a_3d_repo(deep_ct, tmp_path, cli):
    config = write_config(
        tmp_path / "3d.yaml",
        {
            "variant": "macl-unet3d-tiny",
            "steps": 2,
            "views": {"elastic": False},
            "optim": {"batch_size": 2},
            "engine": {"log_every": 1},
        },
    )
    run = tmp_path / "run3d"
    result = cli("train", "macl", "--config", config, "--data", deep_ct, "--out", run, "--no-progress")
    assert result.code == 0, result.err
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(value) for value in losses)
    repo = run / "repos" / "macl"
    verify_repo(repo)
    encoder = AutoModel.from_pretrained(repo)
    assert type(encoder).__name__ == "MaclModel" and encoder.config.spatial_dims == 3
    trained = checkpoint.load(run / "checkpoint.pt")["network"]
    assert torch.equal(encoder.encoder.contr_1_1[0].weight, trained["macl.encoder.contr_1_1.0.weight"])
    torch.manual_seed(1234)  # the run's seed, set before the recipe builds the network
    initial = MaclForPreTraining(encoder.config).macl.encoder.contr_1_1[0].weight
    assert initial.shape == encoder.encoder.contr_1_1[0].weight.shape
    assert 0 < (initial - encoder.encoder.contr_1_1[0].weight).abs().max() < 0.1  # two small SGD steps away
    assert json.loads((repo / "preprocessor_config.json").read_text())["size"] == [32, 32, 32]
    assert "3D sub-volumes of 64 x 64 x 64 voxels" in (repo / "README.md").read_text()
