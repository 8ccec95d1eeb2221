"""The `medhub embed` command as users run it: a real process, its exit code, output, progress bar and errors (the
error paths that need no fresh interpreter run the same `main` in this process, through the `cli` fixture)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_fixtures import image_folder, tiny_encoder_repo

from hub.cli.main import main
from hub.embed import TorchBackend, backends, register_backend

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each command is a new process that imports torch (~5 s)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-cli")
    corrupt = image_folder(root / "corrupt", 3)
    (corrupt / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return {
        "root": root,
        "repo": tiny_encoder_repo(root / "repo", "muscle-resnet18-tiny"),
        "images": image_folder(root / "images", 4),
        "corrupt": corrupt,
    }


def medhub_embed(setup, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "MEDHUB_ONNX_CACHE": str(setup["root"] / "onnx"),
    }
    return subprocess.run(
        [sys.executable, "-m", "hub.cli.main", "embed", *map(str, args)],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_writes_the_dataset_and_its_info_with_a_progress_bar(setup):
    out = setup["root"] / "out"
    done = medhub_embed(setup, setup["repo"], "--data", setup["images"], "--out", out, "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote 4 embeddings (dim 64)")
    assert "4/4" in done.stderr and "img/s" in done.stderr  # tqdm's bar: count, images/s and the ETA
    info = json.loads((out / "embedding_info.json").read_text())
    assert (info["count"], info["errors"], info["dim"], info["complete"]) == (4, 0, 64, True)
    assert info["repo"] == str(setup["repo"]) and info["command"][0].endswith("main.py")
    ids = pq.read_table(out / "data").column("id").to_pylist()
    assert sorted(ids) == ["a/img1.png", "a/img3.png", "b/c/img0.png", "b/c/img2.png"]

    other = tiny_encoder_repo(setup["root"] / "other", "muscle-resnet18-tiny", seed=1)  # other weights: other revision
    refused = medhub_embed(setup, other, "--data", setup["images"], "--out", out, "--resume", "--no-progress")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "holds embeddings made with revision" in refused.stderr
    assert len(pq.read_table(out / "data")) == 4


def test_strict_stops_at_the_first_unreadable_file(setup, cli, monkeypatch):
    monkeypatch.setenv("MEDHUB_ONNX_CACHE", str(setup["root"] / "onnx"))  # in this process: errors need no new one
    out = setup["root"] / "strict"
    done = cli("embed", setup["repo"], "--data", setup["corrupt"], "--out", out, "--strict", "--no-progress")
    assert done.code == 1
    assert done.err.startswith("medhub embed: error: a/broken.png: ") and done.err.count("\n") == 1
    assert "img/s" not in done.err

    lenient = cli(
        "embed", setup["repo"], "--data", setup["corrupt"], "--out", setup["root"] / "lenient", "--no-progress"
    )
    assert lenient.code == 0, lenient.err
    assert "img/s" not in lenient.err
    errors = pq.read_table(setup["root"] / "lenient" / "errors.parquet").to_pylist()
    assert [e["id"] for e in errors] == ["a/broken.png"]


@pytest.mark.parametrize(
    "model, data, expected",
    [
        ("missing-repo", "images", "is neither a repo folder nor an ORG/NAME repo id"),
        ("repo", "missing-data", "does not exist"),
    ],
)
def test_a_bad_model_or_data_is_one_line(setup, cli, model, data, expected):
    root = setup["root"]
    model_arg = setup["repo"] if model == "repo" else root / model
    data_arg = setup["images"] if data == "images" else root / data
    done = cli("embed", model_arg, "--data", data_arg, "--out", root / "bad", "--no-progress")
    assert done.code == 1
    assert done.err.startswith("medhub embed: error: ") and done.err.count("\n") == 1
    assert expected in done.err


class DoubledTorch:
    """A backend from outside serving: torch's features times two, named so that the command's last line shows it."""

    name = "doubled"
    made_with: dict = {}

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        DoubledTorch.made_with = {"device": device, "threads": threads}
        self.torch = TorchBackend(device)

    def open(self, repo_dir: Path, repo_id: str, revision: str):
        run = self.torch.open(repo_dir, repo_id, revision)
        return lambda pixel_values: [2 * output for output in run(pixel_values)]

    def describe(self) -> str:
        return f"doubled:{self.torch.describe()}"


def test_the_backend_is_looked_up_in_the_registry(setup, monkeypatch, capsys):
    monkeypatch.setattr(backends, "_FACTORIES", dict(backends._FACTORIES))
    register_backend("doubled", DoubledTorch)
    common = ["embed", str(setup["repo"]), "--data", str(setup["images"]), "--device", "cpu", "--no-progress"]
    embeddings = {}
    for name in ("torch", "doubled"):
        assert main([*common, "--out", str(setup["root"] / name), "--backend", name]) == 0
        table = pq.read_table(setup["root"] / name / "data").sort_by("id")
        embeddings[name] = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert capsys.readouterr().out.rstrip().endswith("on doubled:torch:cpu; 0 file(s) in errors.parquet")
    assert DoubledTorch.made_with["device"] == "cpu" and DoubledTorch.made_with["threads"] >= 1
    np.testing.assert_allclose(embeddings["doubled"], 2 * embeddings["torch"], rtol=1e-5, atol=1e-6)

    unknown = medhub_embed(
        setup, setup["repo"], "--data", setup["images"], "--out", setup["root"] / "tpu", "--backend", "tpu"
    )
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "embedding backend 'tpu' is not one of onnx, onnx-int8, torch" in unknown.stderr
