"""MEDHUB_WORKERS=2: both worker processes answer, each graph is exported once into the shared ONNX cache (under
its file lock), and /models is the same from either worker; int8 graphs serve over HTTP."""

import io
import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import live_server
from PIL import Image
from test_serving import tiny_encoder_repo, tiny_head_repo

from hub.models.muscle import MuscleForImageClassification

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    repos = [
        tiny_encoder_repo(root / "encoder", "muscle-resnet18-tiny"),
        tiny_head_repo(root / "classifier", MuscleForImageClassification, ["normal", "nodule"]),
    ]
    env = {"MEDHUB_ONNX_CACHE": str(root / "onnx"), "MEDHUB_WORKERS": "2", "MEDHUB_INT8": "1", "MEDHUB_THREADS": "1"}
    with live_server(repos, root / "server.log", env, wait=False) as live:
        answers: dict[str, dict] = {}  # worker pid -> its /models body
        deadline = time.monotonic() + 300
        while len(answers) < 2 and time.monotonic() < deadline:  # a fresh connection each time: either worker accepts
            if live.process.poll() is not None:
                pytest.fail(f"server exited early:\n{live.log_tail()}")
            try:
                response = httpx.get(f"{live.url}/models", timeout=5)
                if response.status_code == 200 and len(response.json()["models"]) == len(repos):
                    answers[response.headers["x-medhub-worker"]] = response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield {"url": live.url, "answers": answers, "log": live.log, "repos": repos, "cache": root / "onnx"}


def test_both_workers_answer_with_the_same_models(two_workers):
    answers = two_workers["answers"]
    assert len(answers) == 2, f"only workers {sorted(answers)} answered /models"
    first, second = answers.values()
    assert first == second
    assert {model["id"] for model in first["models"]} == {str(repo) for repo in two_workers["repos"]}


def test_each_graph_is_exported_once_into_the_shared_cache(two_workers):
    log = two_workers["log"].read_text()
    assert log.count("serving ") >= 4, log[-2000:]  # two models loaded by each of two workers
    for repo, task in [(0, "features"), (1, "features"), (1, "classification")]:
        for name in (f"{task}.onnx", f"{task}.int8.onnx"):
            line = f"exported the {task} graph of {two_workers['repos'][repo]} to the ONNX cache as {name}"
            assert log.count(line) == 1, (line, log[-2000:])
    assert len(list(two_workers["cache"].glob("*/*.int8.onnx"))) == 3


def test_int8_graphs_answer_over_http_from_both_workers(two_workers):
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    encoder, classifier = map(str, two_workers["repos"])
    embeddings = []
    for _ in range(6):  # fresh connections, served by either worker: the same int8 graph gives the same answer
        response = httpx.post(
            f"{two_workers['url']}/embed",
            files={"file": ("x.png", buffer.getvalue(), "application/octet-stream")},
            data={"model": encoder},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        embeddings.append(np.array(response.json()["embedding"]))
    assert all(np.allclose(embedding, embeddings[0], atol=1e-5) for embedding in embeddings)
    labels = httpx.post(
        f"{two_workers['url']}/classify",
        files={"file": ("x.png", buffer.getvalue(), "application/octet-stream")},
        data={"model": classifier},
        timeout=60,
    ).json()["labels"]
    assert sum(label["probability"] for label in labels) == pytest.approx(1.0)


def test_gpu_check_stops_with_one_line_without_a_gpu(tmp_path):
    """nvidia-smi answering as it does on a machine without an NVIDIA driver (exit 9) stops the check at once."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.' >&2\nexit 9\n"
    )
    (fake / "nvidia-smi").chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none); run it on a machine with one"
    ]
