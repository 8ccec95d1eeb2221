"""`medhub demo` at reduced sizes: publishes loadable task repos, writes models.txt last, skips a complete demo."""

import json

import pytest
from transformers import AutoModel

from hub.export import verify_repo
from training import demo
from training.demo import DemoSizes, run_demo
from training.errors import TrainingConfigError

SMALL = DemoSizes(n_xray=9, n_ct=3, moco_steps=2, rounds=1, steps_per_task=1, xray_epochs=1, ct_epochs=1)
HEADS = {
    "demo-test/muscle-resnet18-tiny-xray": "MuscleModel",
    "demo-test/muscle-resnet18-tiny-nodule-classifier": "MuscleForImageClassification",
    "demo-test/muscle-resnet18-tiny-lung-segmenter": "MuscleForSemanticSegmentation",
    "demo-test/macl-unet3d-tiny-ct-liver": "MaclForSemanticSegmentation",
}
EXPECTED_LABELS = {
    "muscle-resnet18-tiny-nodule-classifier": {"0": "no nodule", "1": "nodule"},
    "muscle-resnet18-tiny-lung-segmenter": {"0": "background", "1": "lung", "2": "nodule"},
    "macl-unet3d-tiny-ct-liver": {"0": "background", "1": "liver"},
}


@pytest.mark.slow
def test_demo_publishes_loadable_repos_and_a_complete_demo_is_not_rebuilt(tmp_path, hf_cache, cli, monkeypatch):
    work = tmp_path / "demo"
    ids = run_demo(work, org="demo-test", progress=False, sizes=SMALL)
    assert ids == list(HEADS)
    assert (work / "models.txt").read_text().splitlines() == ids
    for repo_id, architecture in HEADS.items():
        verify_repo(repo_id)  # by id, from the test's cache, offline
        encoder = AutoModel.from_pretrained(repo_id)
        assert type(encoder).__name__ == ("MaclModel" if "macl" in repo_id else "MuscleModel")
        snapshot = next((hf_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())
        config = json.loads((snapshot / "config.json").read_text())
        assert config["architectures"] == [architecture]
        if architecture != "MuscleModel":
            assert config["id2label"] == EXPECTED_LABELS[repo_id.split("/")[1]]

    def must_not_build(*args, **kwargs):
        raise AssertionError("a complete demo was rebuilt")

    monkeypatch.setattr(demo, "build", must_not_build)
    result = cli("demo", "--out", work, "--org", "demo-test", "--no-progress")
    assert result.code == 0 and result.out.splitlines() == ids
    # an id missing from the cache makes the demo incomplete again
    for path in (hf_cache / "models--demo-test--macl-unet3d-tiny-ct-liver").rglob("config.json"):
        path.unlink()
    assert demo.published_ids(work) is None


@pytest.mark.slow
def test_demo_only_muscle_publishes_the_encoder_alone_into_the_named_cache(tmp_path, hf_cache):
    from huggingface_hub import snapshot_download

    isolated = tmp_path / "isolated-cache"
    ids = run_demo(tmp_path / "demo", org="demo-test", progress=False, sizes=SMALL, only="muscle", cache_dir=isolated)
    assert ids == ["demo-test/muscle-resnet18-tiny-xray"]
    snapshot = snapshot_download(ids[0], cache_dir=isolated, local_files_only=True)
    assert type(AutoModel.from_pretrained(snapshot)).__name__ == "MuscleModel"
    assert not hf_cache.exists() and not (tmp_path / "demo" / "models.txt").exists()  # not a complete demo
    with pytest.raises(TrainingConfigError, match="demo part 'ct' is not known"):
        run_demo(tmp_path / "demo", only="ct")
