"""`medhub embed` on ONNX Runtime equals the service's /embed; the Ray engine writes the same dataset."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_fixtures import image_folder, tiny_encoder_repo, volume_folder
from live_server import live_server

from hub.embed import embed_dataset, list_sources
from serving.embed import OnnxBackend, ray_batches

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-serving")
    repos = {
        2: tiny_encoder_repo(root / "r2", "muscle-resnet18-tiny"),
        3: tiny_encoder_repo(root / "r3", "macl-unet3d-tiny"),
    }
    data = {2: image_folder(root / "imgs", 5), 3: volume_folder(root / "vols")}
    return {"root": root, "repos": repos, "data": data, "onnx": root / "onnx"}


@pytest.fixture(scope="module")
def server(setup):
    env = {"MEDHUB_ONNX_CACHE": str(setup["onnx"]), "MEDHUB_THREADS": "1"}
    with live_server(list(setup["repos"].values()), setup["root"] / "server.log", env) as live:
        yield live.url


def embedded(out: Path) -> dict[str, dict[str, np.ndarray]]:
    table = pq.read_table(out / "data").to_pylist()
    return {
        row["id"]: {k: np.asarray(v, np.float32) for k, v in row.items() if k.startswith(("embedding", "layer_"))}
        for row in table
    }


@pytest.mark.parametrize("dims", [2, 3])
def test_values_equal_the_service(dims, setup, server, tmp_path):
    repo, data = setup["repos"][dims], setup["data"][dims]
    embed_dataset(
        repo,
        data,
        tmp_path / "out",
        backend=OnnxBackend("cpu", 1, setup["onnx"]),
        layers=[0, -1],
        workers=2,
        batch_size=4,
    )
    got = embedded(tmp_path / "out")
    worst = 0.0
    for source in list_sources(data):
        response = httpx.post(
            f"{server}/embed",
            files={"file": ("upload.bin", source.path.read_bytes(), "application/octet-stream")},
            data={"model": str(repo), "layers": "0,-1"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        for column, value in (
            ("embedding", body["embedding"]),
            ("layer_0", body["layers"]["0"]),
            ("layer_-1", body["layers"]["-1"]),
        ):
            worst = max(worst, float(np.abs(got[source.id][column] - np.asarray(value, np.float32)).max()))
    print(f"max abs diff vs /embed ({dims}D): {worst:.2e}")
    assert len(got) == len(list_sources(data)) and worst <= 1e-5, worst


def test_the_ray_engine_writes_the_same_dataset(setup, tmp_path, monkeypatch):
    ray_module = pytest.importorskip("ray")
    repo, data = setup["repos"][2], setup["data"][2]
    (data / "notes.txt").write_text("not an image")
    try:
        local = embed_dataset(
            repo, data, tmp_path / "local", backend=OnnxBackend("cpu", 1, setup["onnx"]), layers=[1], shard_size=2
        )
        monkeypatch.setenv("MEDHUB_ONNX_CACHE", str(setup["onnx"]))
        ray = embed_dataset(
            repo,
            data,
            tmp_path / "ray",
            layers=[1],
            shard_size=2,
            batches=ray_batches(str(repo), "onnx", "cpu", 2, [1], actors=2),
        )
    finally:
        (data / "notes.txt").unlink()
        ray_module.shutdown()
    assert (local.count, local.errors) == (ray.count, ray.errors) == (5, 1)
    a, b = embedded(tmp_path / "local"), embedded(tmp_path / "ray")
    assert sorted(a) == sorted(b)
    assert max(float(np.abs(a[k][c] - b[k][c]).max()) for k in a for c in a[k]) <= 1e-5
    assert sorted(p.name for p in (tmp_path / "ray" / "data").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "data").iterdir()
    )
    assert (
        pq.read_table(tmp_path / "ray" / "errors.parquet").to_pylist()
        == pq.read_table(tmp_path / "local" / "errors.parquet").to_pylist()
    )
