"""A timed-out 3D /segment stops its sliding-window tile loop: the server's CPU goes quiet soon after the 504."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from hub.models.macl import MaclForSemanticSegmentation
from test_serving import AUTH, TOKEN, free_port, tiny_head_repo

pytestmark = pytest.mark.slow
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server for the 3D model only, with `MEDHUB_TIMEOUT` (what `medhub serve --timeout` sets) of 3 s."""
    root = tmp_path_factory.mktemp("deadline")
    repo = tiny_head_repo(root / "volume", MaclForSemanticSegmentation, ["background", "liver"], "macl-unet3d-tiny")
    port = free_port()
    log = open(root / "server.log", "w+")
    env = {**os.environ, "MEDHUB_MODELS": str(repo), "MEDHUB_ONNX_CACHE": str(root / "onnx"),
           "MEDHUB_API_TOKEN": TOKEN, "MEDHUB_TIMEOUT": str(TIMEOUT_S), "MEDHUB_THREADS": "1"}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "serving.service:MedhubService", "--host", "127.0.0.1",
         "--port", str(port)], cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    else:
        process.kill()
        log.seek(0)
        pytest.fail(f"server not ready:\n{log.read()[-3000:]}")
    yield {"url": url, "repo": repo, "process": psutil.Process(process.pid)}
    process.terminate()
    process.wait(timeout=30)
    log.close()


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time (user + system) of the server and all its worker processes so far."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def test_a_timed_out_3d_request_frees_its_core_within_2_s(slow_server, tmp_path):
    # 160^3 voxels in 32^3 tiles at 50% overlap: 729 tiles, far more than 3 s of work on one core
    volume = (np.random.default_rng(0).random((160, 160, 160)) * 1000).astype(np.int16)
    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
    started = time.monotonic()
    response = httpx.post(f"{slow_server['url']}/segment", files={"file": ("v.nii.gz", path.read_bytes())},
                          data={"model": str(slow_server["repo"]), "format": "json"}, headers=AUTH, timeout=120)
    answered = time.monotonic()
    assert response.status_code == 504, response.text
    assert answered - started < TIMEOUT_S + 2
    time.sleep(2)
    before = cpu_seconds(slow_server["process"])
    time.sleep(3)
    busy = cpu_seconds(slow_server["process"]) - before
    assert busy < 0.5, f"the server used {busy:.2f} s of CPU in 3 s, from 2 s after its 504"
    assert httpx.get(f"{slow_server['url']}/readyz").status_code == 200
