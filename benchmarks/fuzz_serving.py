"""Fuzz a real `medhub` service with N mutated inputs per format (the fuzzer of tests/fuzzing.py) and print, per
format: status counts, p50/p99/max seconds, 5xx and unanswered counts; then the server's peak RSS (all its
processes), its RSS at start and end, worker restarts, each process's RSS and USS (the arbiter, then its
workers), and the exception classes in the server log.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fuzz_serving.py --per-format 2000

Acceptance (issue 13): 0 5xx, 0 unanswered, 0 restarts, every answer under 5 s, peak RSS under 4 GiB with the
default limits.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzzing import (
    FORMATS,
    campaign,
    encode,
    ready_status,
    seeds,
    serve,
    server_exceptions,
)
from test_serving import tiny_head_repo

import hub  # noqa: F401
from hub.models.macl import MaclForSemanticSegmentation
from hub.models.muscle import MuscleForImageClassification

MIB = 1024**2


def served_models(root: Path) -> dict[str, str]:
    """The two models the fuzz and soak runs serve: a tiny 2D classifier and a tiny 3D segmenter, by dimensionality."""
    return {
        "2d": str(tiny_head_repo(root / "classifier", MuscleForImageClassification, ["a", "b"])),
        "3d": str(tiny_head_repo(root / "volume", MaclForSemanticSegmentation, ["a", "b"], "macl-unet3d-tiny")),
    }


def warm_up(url: str, models: dict[str, str]) -> None:
    for key, data in (("2d", encode(np.zeros((64, 64), dtype=np.uint8), "PNG")), ("3d", seeds("nifti")[0])):
        response = httpx.post(
            f"{url}/embed", files={"file": ("upload.bin", data)}, data={"model": models[key]}, timeout=300
        )
        response.raise_for_status()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-format", type=int, default=2000, help="inputs per format (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=2, help="keep-alive clients sending at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = served_models(root)
        with serve([Path(m) for m in models.values()], root / "server") as server:
            warm_up(server.url, models)
            server.rss_start = server.rss()
            start = server.memory(), server.memory(unique=True)
            with tqdm(total=args.per_format * len(FORMATS), disable=args.no_progress, unit="req") as bar:
                outcomes = campaign(
                    server,
                    models,
                    args.per_format,
                    seed=args.seed,
                    clients=args.clients,
                    timeout=args.timeout,
                    progress=bar.update,
                )
            rss_end = server.rss()
            end = server.memory(), server.memory(unique=True)
            ready = ready_status(server)
            exceptions = server_exceptions(server.log)

    print(
        f"\nfuzz_serving: {args.per_format} inputs per format, seed {args.seed}, {args.clients} clients, default limits"
    )
    print(
        f"{'format':<7} {'n':>6} {'2xx':>6} {'4xx':>6} {'5xx':>5} {'none':>5} {'p50 s':>7} {'p99 s':>7} "
        f"{'max s':>7} {'>5s':>4}  statuses"
    )
    for fmt in FORMATS + ("all",):
        rows = [o for o in outcomes if fmt in ("all", o.fmt)]
        statuses = collections.Counter(o.status for o in rows)
        seconds = [o.seconds for o in rows]
        print(
            f"{fmt:<7} {len(rows):>6} {sum(v for k, v in statuses.items() if 200 <= k < 300):>6} "
            f"{sum(v for k, v in statuses.items() if 400 <= k < 500):>6} "
            f"{sum(v for k, v in statuses.items() if k >= 500):>5} {statuses.get(0, 0):>5} "
            f"{percentile(seconds, 50):>7.3f} {percentile(seconds, 99):>7.3f} {max(seconds, default=0):>7.2f} "
            f"{sum(s > 5 for s in seconds):>4}  {dict(sorted(statuses.items()))}"
        )
    print(
        f"server RSS: start {server.rss_start / MIB:.0f} MiB, end {rss_end / MIB:.0f} MiB, "
        f"peak {server.rss_peak / MIB:.0f} MiB; worker restarts {server.restarts}; "
        f"killed for memory: {server.killed_for_memory}; /readyz after: {ready}"
    )
    for role, pid in zip(["arbiter"] + ["worker"] * (len(start[0]) - 1), start[0]):
        print(
            f"  {role} {pid}: RSS start {start[0][pid] / MIB:.0f}, end {end[0].get(pid, 0) / MIB:.0f}, "
            f"peak {server.process_peaks.get(pid, 0) / MIB:.0f} MiB; USS start {start[1].get(pid, 0) / MIB:.0f}, "
            f"end {end[1].get(pid, 0) / MIB:.0f} MiB"
        )
    print(f"server log exceptions: {exceptions or 'none'}")
    failures = [o for o in outcomes if o.status >= 500 or o.status == 0]
    for outcome in failures[:20]:
        print(f"  {outcome.fmt} #{outcome.index} {outcome.mutation}: {outcome.status} {outcome.body[:100]!r}")
    checks = {
        "0 5xx or unanswered": not failures,
        "0 worker restarts": server.restarts == 0 and not server.killed_for_memory,
        "every answer < 5 s": all(o.seconds < 5 for o in outcomes),
        "peak RSS < 4 GiB": server.rss_peak < 4 * 1024 * MIB,
        "/readyz 200 after": ready == 200,
    }
    print("acceptance: " + "; ".join(f"{name} {'ok' if passed else 'FAILED'}" for name, passed in checks.items()))
    if not all(checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
