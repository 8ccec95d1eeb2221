"""A timed-out 3D /segment stops its sliding-window tile loop: the server's CPU goes quiet soon after the 504."""

import time

import httpx
import numpy as np
import psutil
import pytest
import SimpleITK as sitk
from live_server import live_server
from test_serving import AUTH, TOKEN, shared_onnx_cache, shared_repos

pytestmark = pytest.mark.slow
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, built_once):
    """A server for the 3D model only, with `MEDHUB_TIMEOUT` (what `medhub serve --timeout` sets) of 3 s."""
    root = tmp_path_factory.mktemp("deadline")
    repo = shared_repos(built_once)["volume"]
    env = {
        "MEDHUB_ONNX_CACHE": str(shared_onnx_cache(built_once)),
        "MEDHUB_API_TOKEN": TOKEN,
        "MEDHUB_TIMEOUT": str(TIMEOUT_S),
        "MEDHUB_THREADS": "1",
    }
    with live_server([repo], root / "server.log", env) as live:
        yield {"url": live.url, "repo": repo, "process": psutil.Process(live.process.pid)}


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
    response = httpx.post(
        f"{slow_server['url']}/segment",
        files={"file": ("v.nii.gz", path.read_bytes())},
        data={"model": str(slow_server["repo"]), "format": "json"},
        headers=AUTH,
        timeout=120,
    )
    answered = time.monotonic()
    assert response.status_code == 504, response.text
    assert answered - started < TIMEOUT_S + 2
    time.sleep(2)
    before = cpu_seconds(slow_server["process"])
    time.sleep(3)
    busy = cpu_seconds(slow_server["process"]) - before
    assert busy < 0.5, f"the server used {busy:.2f} s of CPU in 3 s, from 2 s after its 504"
    assert httpx.get(f"{slow_server['url']}/readyz").status_code == 200
