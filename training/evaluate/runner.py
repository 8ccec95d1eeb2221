"""Running a study's units: one JSON row per unit appended to DIR/results.jsonl as it ends; --resume skips the
units already there; in this process, in N local processes, or as Ray tasks."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.errors import TrainingConfigError

from .study import Study, Unit
from .units import run_unit

RESULTS = "results.jsonl"


def read_results(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append(out: Path, row: dict[str, Any]) -> None:
    with open(out / RESULTS, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(row) + "\n")
        stream.flush()


def run_study(
    study: Study, out: Path, *, jobs: int = 1, engine: str = "local", resume: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """Run every unit not yet in DIR/results.jsonl (with `resume`; without it DIR must hold no results)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {row["key"] for row in read_results(out)}
    if done and not resume:
        raise TrainingConfigError(f"{out / RESULTS} already holds {len(done)} units; pass --resume to continue it")
    pending = [unit for unit in study.units() if unit.key not in done]
    bar = tqdm(total=len(pending), desc="evaluate", unit="unit", disable=not progress)
    if engine == "ray":
        _run_ray(study, pending, out, bar)
    elif engine != "local":
        raise TrainingConfigError(f"engine {engine!r} is not one of local, ray")
    elif jobs <= 1:
        for unit in pending:
            _append(out, run_unit(study, unit, out))
            bar.update()
    else:
        # spawn, not fork: a forked child of a process that has run torch can hang in its thread pools
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_unit, study, unit, out) for unit in pending]
            for future in as_completed(futures):
                _append(out, future.result())
                bar.update()
    bar.close()
    return read_results(out)


def _run_ray(study: Study, pending: list[Unit], out: Path, bar: tqdm) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_unit)
    waiting = [remote.remote(study, unit, out) for unit in pending]
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        _append(out, ray.get(ready[0]))
        bar.update()
