"""Fuzz a real `bentoml serve` process with mutated PNG, JPEG, DICOM and NIfTI uploads (tests/fuzzing.py).

300 inputs per format, default limits, two keep-alive clients. Every answer must be a non-5xx status within 5 s
(an answer that took longer is sent again alone and must then take less: a hang or a slow path stays slow, while a
machine busy with the suite's other worker does not);
afterwards /readyz is 200, and the server's resident memory (all its processes) grew by less than 1 GiB over its
warmed-up start and never passed 4 GiB. A watchdog kills the server above 8 GiB (the machine may be shared), which
fails the test; the failure message lists status counts, the first failing inputs (format, index, mutation: replay
them with `fuzzing.case(format, 0, index)`) and the exception classes in the server log."""

import collections

import numpy as np
import pytest
from fuzzing import FORMATS, campaign, ready_status, seeds, send_case, serve, server_exceptions
from test_serving import png_bytes, shared_onnx_cache, shared_repos

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")

PER_FORMAT = 300
SEED = 0
CLIENT_TIMEOUT_S = 30
SLOWEST_S = 5.0
GIB = 1024**3
GROWTH_BOUND = 1 * GIB
PEAK_BOUND = 4 * GIB


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, built_once):
    root = tmp_path_factory.mktemp("fuzz")
    repos = shared_repos(built_once)
    models = {"2d": repos["classifier"], "3d": repos["volume"]}
    with serve(list(models.values()), root / "server", MEDHUB_ONNX_CACHE=str(shared_onnx_cache(built_once))) as server:
        warm = {"2d": png_bytes(np.zeros((64, 64), dtype=np.uint8)), "3d": seeds("nifti")[0]}
        for key, model in models.items():  # build each model's ONNX session before RSS is measured
            response = httpx.post(
                f"{server.url}/embed",
                files={"file": ("upload.bin", warm[key])},
                data={"model": str(model)},
                timeout=120,
            )
            assert response.status_code == 200, response.text
        server.rss_start = server.rss()
        yield server, {key: str(model) for key, model in models.items()}


def test_mutated_uploads_never_get_5xx_hang_or_leak(fuzz_server):
    server, models = fuzz_server
    outcomes = campaign(server, models, PER_FORMAT, seed=SEED, clients=2, timeout=CLIENT_TIMEOUT_S)
    rss_end = server.rss()

    counts = {fmt: collections.Counter(o.status for o in outcomes if o.fmt == fmt) for fmt in FORMATS}
    failures = [o for o in outcomes if o.status >= 500 or o.status == 0]
    slow = [o for o in outcomes if o.seconds > SLOWEST_S]
    with httpx.Client() as client:  # under load from the suite's other worker; a hang stays slow when sent alone
        slow_alone = [
            again
            for o in slow
            if (again := send_case(client, server, models, o.fmt, o.index, SEED, CLIENT_TIMEOUT_S)).seconds > SLOWEST_S
        ]
    report = (
        f"status counts {counts}; peak RSS {server.rss_peak >> 20} MiB; restarts "
        f"{server.restarts}; server exceptions {server_exceptions(server.log)}; "
        f"first failures {[(o.fmt, o.index, o.mutation, o.status, o.body[:120]) for o in failures[:8]]}; "
        f"{len(slow)} over {SLOWEST_S} s, of which slow when sent alone "
        f"{[(o.fmt, o.index, o.mutation, round(o.seconds, 1)) for o in slow_alone[:8]]}"
    )
    assert len(outcomes) == PER_FORMAT * len(FORMATS)
    assert not server.killed_for_memory, f"server killed at {server.rss_peak} bytes RSS; {report}"
    assert not failures, report
    for fmt in FORMATS:  # the mutations must reach both decoded (200) and refused (4xx) inputs in each format
        assert counts[fmt][200] > 0 and any(400 <= status < 500 for status in counts[fmt]), report
    assert not slow_alone, report
    assert ready_status(server) == 200, report
    assert server.restarts == 0, report
    assert rss_end - server.rss_start < GROWTH_BOUND, f"RSS {server.rss_start} -> {rss_end} bytes; {report}"
    assert server.rss_peak < PEAK_BOUND, f"peak RSS {server.rss_peak} bytes; {report}"
