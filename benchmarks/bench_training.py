"""Training-step throughput of every recipe at the tiny and paper presets on this machine (CPU unless CUDA), and
peak memory of one UMedPT step with 1, 3 and 6 tasks.

Each step is the engine's own (`Engine._step`: forward, backward, optimiser step, after-step hooks) on the recipe's
own stage, built from the phantom data (`hub.data.phantoms.generate`). Tiny: 1 warm-up + 3 timed steps at the
preset's batch. Paper: the paper model at a small batch (printed), 1 warm-up + 1 timed step; a step that runs past
60 s is reported as skipped. MedCoSS is timed on its X-ray MAE stage alone (no text stage, so no rehearsal).
UMedPT memory: a fresh interpreter per task count measures the RSS growth of one step (tiny model, tasks cycling
classification/segmentation/detection, batches read before measuring); it should not grow with the task count.
Run: .venv/bin/python benchmarks/bench_training.py
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from hub.data.phantoms import generate
from training.config import load_recipe_config
from training.distributed import DistInfo
from training.engine import Engine, make_optimizer, warmup_cosine
from training.launch import seed_everything
from training.recipes import get_recipe

PAPER_BATCH = 2
PAPER_LIMIT_S = 60
# (label, recipe, stage index, config overrides for every preset)
STEPS = [
    ("muscle MoCo", "muscle", 0, {}),
    ("muscle continual", "muscle", 1, {}),
    ("umedpt multi-task (3 tasks)", "umedpt", 0, {}),
    ("macl", "macl", 0, {}),
    ("medcoss MAE (xray)", "medcoss", 0, {"stages": ["xray"]}),
]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _overrides(recipe: str, preset: str, base: dict) -> dict:
    engine = {"progress": False, "checkpoint_every": 100000, "num_workers": 0}
    override = {**base, "engine": engine}
    if preset == "paper":
        batch = {"optim": {"batch_size": PAPER_BATCH}}
        if recipe == "muscle":
            override.update(moco=batch, continual=batch)
        else:
            override.update(batch)
    return override


def time_step(
    recipe_name: str, stage_index: int, preset: str, base: dict, manifest: Path, tmp: Path, dist: DistInfo
) -> tuple[float, int, float]:
    """(samples/s, batch, seconds per step) of `recipe_name`'s stage `stage_index` at `preset`."""
    entry = get_recipe(recipe_name)
    config = tmp / f"{recipe_name}-{preset}.yaml"
    config.write_text(yaml.safe_dump(_overrides(recipe_name, preset, base)))
    settings = load_recipe_config(entry.settings_class, recipe_name, preset, config)
    seed_everything(settings.seed)
    recipe = entry.build(settings, [manifest], dist)
    recipe.network.to(dist.device)
    stage = recipe.stages()[stage_index]
    engine = Engine(tmp / "run", settings.engine, dist)
    optimizer = make_optimizer(stage.optimizer_groups(), stage.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage.num_steps, 0, 0.0))
    scaler = torch.amp.GradScaler("cuda", enabled=engine.amp)
    stage.start()
    timed = 3 if preset == "tiny" else 1
    engine._step(recipe, stage, 0, optimizer, scheduler, scaler)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    for step in range(1, 1 + timed):
        engine._step(recipe, stage, step, optimizer, scheduler, scaler)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - tick) / timed
    return stage.samples_per_step / seconds, stage.samples_per_step, seconds


def throughput(manifest: Path, tmp: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = DistInfo(0, 1, device, None)
    print(
        f"training-step throughput on {device.type} ({torch.get_num_threads()} threads); "
        f"paper = paper model at batch {PAPER_BATCH} per task/step, 1 timed step"
    )
    print(
        f"{'step':30s} {'tiny samples/s':>16s} {'(batch)':>8s} {'paper samples/s':>18s} {'(batch)':>8s} {'s/step':>8s}"
    )
    signal.signal(signal.SIGALRM, _alarm)
    for label, recipe, stage_index, base in STEPS:
        tiny, tiny_batch, _ = time_step(recipe, stage_index, "tiny", base, manifest, tmp, dist)
        signal.alarm(PAPER_LIMIT_S * 3)  # build + warm-up + one timed step
        try:
            paper, paper_batch, seconds = time_step(recipe, stage_index, "paper", base, manifest, tmp, dist)
            paper_cells = f"{paper:18.2f} {paper_batch:8d} {seconds:8.1f}"
            if seconds > PAPER_LIMIT_S:
                paper_cells = f"  skipped (one step took {seconds:.0f} s > {PAPER_LIMIT_S} s)"
        except _Timeout:
            paper_cells = f"  skipped (build + 2 steps ran past {PAPER_LIMIT_S * 3} s)"
        finally:
            signal.alarm(0)
        print(f"{label:30s} {tiny:16.2f} {tiny_batch:8d} {paper_cells}", flush=True)


def peak_one(num_tasks: int, manifest: Path, tmp: Path) -> None:
    """In this (fresh) process: RSS growth of one UMedPT step with `num_tasks` tiny tasks."""
    torch.set_num_threads(1)
    entry = get_recipe("umedpt")
    kinds = [dict(t.__dict__) for t in load_recipe_config(entry.settings_class, "umedpt", "tiny").tasks]
    tasks = [{**kinds[i % len(kinds)], "name": f"{kinds[i % len(kinds)]['name']}-{i}"} for i in range(num_tasks)]
    for task in tasks:
        task.pop("manifest")
        task.pop("head")
    config = tmp / f"umedpt-peak-{num_tasks}.yaml"
    config.write_text(yaml.safe_dump({"tasks": tasks, "optim": {"batch_size": 4}, "engine": {"progress": False}}))
    settings = load_recipe_config(entry.settings_class, "umedpt", "tiny", config)
    seed_everything(settings.seed)
    recipe = entry.build(settings, [manifest], DistInfo(0, 1, torch.device("cpu"), None))
    stage = recipe.stages()[0]
    for index in range(num_tasks):
        stage.loaders[index].get(0)
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    stage.loss(0)[0].backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - before) / 1024:.1f}")


def peak_memory(manifest: Path, tmp: Path) -> None:
    print("UMedPT step peak memory (RSS growth of one step, tiny model, batch 4 per task, fresh process per count)")
    for num_tasks in (1, 3, 6):
        result = subprocess.run(
            [sys.executable, __file__, "--peak", str(num_tasks), "--manifest", str(manifest), "--tmp", str(tmp)],
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"  {num_tasks} task(s): {result.stdout.strip().splitlines()[-1]} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak is not None:
        peak_one(args.peak, args.manifest, args.tmp)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    manifest = generate(tmp / "phantoms", seed=0, n_xray=8, n_ct=2, n_mri=0, n_pathology=0, progress=False)
    start = time.perf_counter()
    peak_memory(manifest, tmp)
    throughput(manifest, tmp)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
