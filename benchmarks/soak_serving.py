"""Soak a real `medhub` service: C keep-alive clients send valid 2D and 3D requests for S seconds, then an overload
burst (more requests at once than MEDHUB_MAX_CONCURRENCY admits) checks that the excess gets 429 and nothing else.
Prints requests, errors (anything but 200 in the soak; anything but 200/429 in the burst), p50/p99 seconds and
the server's RSS (all its processes) at start and end.

RSS is read twice as a start: cold (after one request per model) and warm (after a warm-up round: a short soak
at the same concurrency and one burst). Growth from cold includes the memory a first round of C requests in
flight and a burst of large images claim once (buffers, allocator pools); growth from warm is what the 60 s then
keep adding, which is where a leak shows.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/soak_serving.py --clients 32 --seconds 60

Acceptance (issue 13): 0 errors and RSS growth under 10 %.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_serving import percentile, served_models, warm_up
from fuzzing import encode, ready_status, seeds, serve

MIB = 1024**2


def requests_for(models: dict[str, str]) -> list[tuple[str, str, bytes]]:
    """Valid inputs: the fuzzer's PNG, JPEG and DICOM seeds to the 2D model (/embed, /classify), small NIfTI to 3D."""
    work = []
    for fmt in ("png", "jpeg", "dicom"):
        for data in seeds(fmt):
            work += [("embed", models["2d"], data), ("classify", models["2d"], data)]
    work += [("embed", models["3d"], data) for data in seeds("nifti")[:2]]
    return work


def post(client: httpx.Client, url: str, job: tuple[str, str, bytes], timeout: float) -> tuple[int, float]:
    route, model, data = job
    start = time.perf_counter()
    try:
        status = client.post(
            f"{url}/{route}", files={"file": ("upload.bin", data)}, data={"model": model}, timeout=timeout
        ).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - start


def soak(url: str, work: list, clients: int, seconds: float, timeout: float) -> list[tuple[int, float]]:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop(offset: int) -> None:
        with httpx.Client() as client:
            i = offset
            while time.monotonic() < stop_at:
                outcome = post(client, url, work[i % len(work)], timeout)
                i += 1
                with lock:
                    results.append(outcome)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def burst(url: str, job: tuple[str, str, bytes], n: int, timeout: float) -> list[tuple[int, float]]:
    barrier = threading.Barrier(n)

    def one(_: int) -> tuple[int, float]:
        with httpx.Client() as client:
            barrier.wait()
            return post(client, url, job, timeout)

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-concurrency", type=int, default=32, help="the server's MEDHUB_MAX_CONCURRENCY")
    parser.add_argument("--burst", type=int, default=96, help="requests sent at once after the soak")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--warm-up-seconds", type=float, default=10.0, help="the warm-up round's soak")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = served_models(root)
        with serve(
            [Path(m) for m in models.values()], root / "server", MEDHUB_MAX_CONCURRENCY=str(args.max_concurrency)
        ) as server:
            warm_up(server.url, models)
            rss_cold = server.rss()
            rng = np.random.default_rng(0)
            heavy = ("embed", models["2d"], encode((rng.random((1500, 1500)) * 65535).astype(np.uint16), "PNG"))
            soak(server.url, requests_for(models), args.clients, args.warm_up_seconds, args.timeout)
            burst(server.url, heavy, args.burst, args.timeout)
            rss_start = server.rss()
            results = soak(server.url, requests_for(models), args.clients, args.seconds, args.timeout)
            rss_soak = server.rss()
            burst_results = burst(server.url, heavy, args.burst, args.timeout)
            rss_end = server.rss()
            ready = ready_status(server)

    statuses = collections.Counter(status for status, _ in results)
    seconds = [s for _, s in results]
    burst_statuses = collections.Counter(status for status, _ in burst_results)
    print(
        f"\nsoak_serving: {args.clients} keep-alive clients for {args.seconds:.0f} s, "
        f"MEDHUB_MAX_CONCURRENCY={args.max_concurrency}"
    )
    print(f"{'phase':<7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 s':>7} {'p99 s':>7}  statuses")
    print(
        f"{'soak':<7} {len(results):>8} {sum(v for k, v in statuses.items() if k != 200):>6} "
        f"{len(results) / args.seconds:>7.1f} {percentile(seconds, 50):>7.3f} {percentile(seconds, 99):>7.3f}  "
        f"{dict(sorted(statuses.items()))}"
    )
    burst_seconds = [s for _, s in burst_results]
    print(
        f"{'burst':<7} {len(burst_results):>8} {sum(v for k, v in burst_statuses.items() if k not in (200, 429)):>6} "
        f"{'':>7} {percentile(burst_seconds, 50):>7.3f} {percentile(burst_seconds, 99):>7.3f}  "
        f"{dict(sorted(burst_statuses.items()))}"
    )
    for name, start in (("cold", rss_cold), ("warm", rss_start)):
        print(
            f"server RSS from {name} start {start / MIB:.0f} MiB: after soak {rss_soak / MIB:.0f} MiB "
            f"({(rss_soak - start) / start:+.1%}), after burst {rss_end / MIB:.0f} MiB "
            f"({(rss_end - start) / start:+.1%})"
        )
    print(f"peak {server.rss_peak / MIB:.0f} MiB; worker restarts {server.restarts}; /readyz after: {ready}")


if __name__ == "__main__":
    main()
