"""hub.embed: the dataset equals the in-process transformers loop; errors, resume and the Parquet readers."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from embed_fixtures import image_folder, tiny_encoder_repo, volume_folder
from transformers import AutoImageProcessor, AutoModel

from hub.embed import EmbedSource, embed_batches, embed_dataset, list_sources
from hub.io import ReadLimits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo2d(tmp_path_factory) -> Path:
    return tiny_encoder_repo(tmp_path_factory.mktemp("r2") / "repo", "muscle-resnet18-tiny")


@pytest.fixture(scope="module")
def repo3d(tmp_path_factory) -> Path:
    return tiny_encoder_repo(tmp_path_factory.mktemp("r3") / "repo", "macl-unet3d-tiny")


def rows(out: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(out / "data")
    return dict(zip(table["id"].to_pylist(), np.asarray(table["embedding"].to_pylist(), dtype=np.float32)))


def reference(repo: Path, path: Path) -> np.ndarray:
    """What a user writes with transformers: AutoImageProcessor + AutoModel (3D: the processor's tiles, mean)."""
    processor = AutoImageProcessor.from_pretrained(repo)
    model = AutoModel.from_pretrained(repo).eval()
    with torch.inference_mode():
        if processor.spatial_dims == 3:
            tiles = torch.from_numpy(processor.tile(path).tiles)
            return model(pixel_values=tiles).pooler_output.double().mean(0).float().numpy()
        return model(**processor(str(path))).pooler_output[0].numpy()


def test_list_sources_walks_folders_and_manifests(tmp_path):
    folder = image_folder(tmp_path / "imgs", 4)
    assert [s.id for s in list_sources(folder)] == ["a/img1.png", "a/img3.png", "b/c/img0.png", "b/c/img2.png"]
    manifest = tmp_path / "imgs" / "m.jsonl"
    manifest.write_text(
        '{"path": "a/img1.png", "modality": "xray", "split": "val", "labels": {"nodule": 1}}\n'
        '{"path": "b/c/img0.png", "modality": "xray", "split": "train"}\n'
    )
    assert list_sources(manifest) == [
        EmbedSource("a/img1.png", folder / "a/img1.png", "val", {"nodule": 1.0}),
        EmbedSource("b/c/img0.png", folder / "b/c/img0.png", "train", {}),
    ]


@pytest.mark.parametrize("dims", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_values_equal_the_transformers_loop(dims, repo2d, repo3d, tmp_path):
    repo = repo2d if dims == 2 else repo3d
    folder = image_folder(tmp_path / "in", 5) if dims == 2 else volume_folder(tmp_path / "in")
    result = embed_dataset(repo, folder, tmp_path / "out", batch_size=3, layers=[0, -1], shard_size=2)
    got = rows(tmp_path / "out")
    assert result.count == len(got) == len(list_sources(folder)) and result.errors == 0
    worst = max(float(np.abs(got[s.id] - reference(repo, s.path)).max()) for s in list_sources(folder))
    assert worst <= 1e-4, worst
    info = json.loads((tmp_path / "out" / "embedding_info.json").read_text())
    assert (
        info["complete"]
        and info["count"] == result.count
        and info["dim"] == result.dim == next(iter(got.values())).shape[0]
    )
    table = pq.read_table(tmp_path / "out" / "data")
    assert (
        table.schema.field("layer_0").type.list_size > 0 and table.schema.field("embedding").type.value_type == "float"
    )


@pytest.mark.slow
def test_batches_in_worker_processes_keep_order_and_values(repo2d, tmp_path):
    sources = list_sources(image_folder(tmp_path / "in", 5))
    batches = list(embed_batches(repo2d, sources, batch_size=2, layers=[1], workers=2))
    assert [i for b in batches for i in b.ids] == [s.id for s in sources]
    single = next(embed_batches(repo2d, sources[:1], layers=[1]))
    np.testing.assert_allclose(batches[0].layers[1][0], single.layers[1][0], atol=1e-5)


def test_bad_files_land_in_errors_and_the_rest_embeds(repo2d, tmp_path):
    folder = image_folder(tmp_path / "in", 3)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    big = np.zeros((600, 600), np.uint8)
    from PIL import Image

    Image.fromarray(big).save(folder / "big.png")
    result = embed_dataset(repo2d, folder, tmp_path / "out", limits=ReadLimits(max_pixels=500 * 500))
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    classes = {e["id"]: e["error_class"] for e in errors}
    assert classes == {
        "corrupt.png": "CorruptFileError",
        "empty.dcm": "CorruptFileError",
        "notes.txt": "UnsupportedFormatError",
        "big.png": "LimitExceededError",
    }
    assert all(e["message"] for e in errors)
    assert result.count == 3 and sorted(rows(tmp_path / "out")) == ["a/img1.png", "b/c/img0.png", "b/c/img2.png"]


def test_readers_see_one_dataset_with_splits_and_labels(repo2d, tmp_path):
    folder = image_folder(tmp_path / "in", 4)
    lines = [
        {"path": s.id, "modality": "xray", "split": "train" if i < 3 else "test", "labels": {"nodule": i % 2}}
        for i, s in enumerate(list_sources(folder))
    ]
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    embed_dataset(repo2d, manifest, tmp_path / "out", shard_size=2)
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out"))
    assert {k: v.num_rows for k, v in loaded.items()} == {"train": 3, "test": 1}
    assert loaded["test"][0]["label_nodule"] == 1.0
    import duckdb

    count = duckdb.sql(f"select count(*) from read_parquet('{tmp_path / 'out' / 'data'}/*.parquet')").fetchall()[0][0]
    assert count == 4


def test_a_different_model_into_the_same_folder_is_refused(repo2d, repo3d, tmp_path):
    folder = image_folder(tmp_path / "in", 2)
    embed_dataset(repo2d, folder, tmp_path / "out")
    with pytest.raises(Exception, match="revision"):
        embed_dataset(repo3d, folder, tmp_path / "out")


KILLED_RUN = """
import sys
from hub.embed import embed_dataset
embed_dataset(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=2, batch_size=1, workers=2)
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_rows(repo2d, tmp_path):
    folder = image_folder(tmp_path / "in", 12)
    embed_dataset(repo2d, folder, tmp_path / "whole", shard_size=2)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(repo2d), str(folder), str(out)], env=env, start_new_session=True
    )
    shards = out / ".shards"

    def finished() -> int:  # shard state files, not the `.tmp-*` file of one being written
        return len([path for path in shards.glob("*.json") if not path.name.startswith(".")])

    while process.poll() is None and finished() < 2:
        pass
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = finished()
    assert 2 <= done < 6, done  # killed mid-way
    result = embed_dataset(repo2d, folder, out, resume=True, shard_size=2)
    assert result.skipped_shards >= 2
    whole, resumed = rows(tmp_path / "whole"), rows(out)
    assert pq.read_table(out / "data").num_rows == len(resumed) == len(whole) == 12
    assert sorted(whole) == sorted(resumed)
    assert max(float(np.abs(whole[k] - resumed[k]).max()) for k in whole) <= 1e-5
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
