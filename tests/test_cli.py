"""The `medhub` command line: the catalogue, and one clear line with a non-zero exit for user mistakes."""

import json

import pytest


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.code not in (0, None)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_models_lists_the_catalogue(cli):
    result = cli("models")
    assert result.code == 0
    for variant in ("muscle-resnet18", "muscle-resnet50", "muscle-resnet18-tiny"):
        assert variant in result.out
    rows = json.loads(cli("models", "--json").out)
    resnet50 = next(row for row in rows if row["variant"] == "muscle-resnet50")
    assert resnet50["family"] == "muscle" and resnet50["modality"] == "xray" and resnet50["dims"] == "2D"
    assert "2310.02000" in resnet50["paper"]


def test_unknown_variant_names_it_and_suggests(cli, tmp_path):
    result = cli("init", "muscle-resnet81", "--out", tmp_path / "r")
    assert_one_line_error(result, "unknown variant 'muscle-resnet81'", "muscle-resnet18")
    assert not (tmp_path / "r").exists()


def test_non_empty_output_folder_needs_overwrite(cli, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = cli("init", "muscle-resnet18-tiny", "--out", out)
    assert_one_line_error(result, f"output folder {out} is not empty", "--overwrite")
    assert (out / "notes.txt").read_text() == "keep me"
    assert cli("init", "muscle-resnet18-tiny", "--out", out, "--overwrite").code == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("repo_id", ["muscle", "org/", "org/name/extra", "org/na me", "org/-name", "org/a..b"])
def test_malformed_repo_id(cli, tmp_path, repo_id):
    assert cli("init", "muscle-resnet18-tiny", "--out", tmp_path / "r").code == 0
    result = cli("publish", tmp_path / "r", "--repo-id", repo_id, "--cache", "--cache-dir", tmp_path / "c")
    assert_one_line_error(result, f"repo id {repo_id!r} is malformed", "ORG/NAME")
    assert not (tmp_path / "c").exists()


def test_repo_folder_without_config(cli, tmp_path):
    folder = tmp_path / "not-a-repo"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert_one_line_error(cli("verify", folder), "has no config.json")
    assert_one_line_error(cli("publish", folder, "--repo-id", "org/x", "--cache"), "has no config.json")
    assert_one_line_error(
        cli("export", folder, "--variant", "muscle-resnet18-tiny", "--out", tmp_path / "o"), "has no config.json"
    )


def test_verify_of_unknown_id_offline(cli, hf_cache):
    assert_one_line_error(cli("verify", "org/never-published"), "org/never-published", "not in the local cache")


def test_export_turns_a_saved_head_into_a_repo(cli, tmp_path, tiny_config):
    from hub.models.muscle import MuscleForImageClassification

    tiny_config.num_labels = 2
    MuscleForImageClassification(tiny_config).save_pretrained(tmp_path / "run")
    result = cli("export", tmp_path / "run", "--variant", "muscle-resnet18-tiny", "--out", tmp_path / "repo")
    assert result.code == 0, result.err
    assert "MuscleForImageClassification" in result.out
    assert cli("verify", tmp_path / "repo").code == 0
