"""Shared helpers of the training tests: phantom X-ray manifests, a very small MUSCLE configuration, torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from hub.data.phantoms import generate

# 3 MoCo steps, then 2 rounds x 2 tasks x 2 steps: the smallest run that crosses a stage and task visits.
MICRO_MUSCLE = {
    "engine": {"checkpoint_every": 100, "log_every": 1, "progress": False},
    "moco": {"steps": 3, "queue_size": 8, "optim": {"batch_size": 2}},
    "continual": {
        "rounds": 2,
        "steps_per_task": 2,
        "optim": {"batch_size": 2},
        "tasks": [
            {"name": "nodule", "kind": "classification", "label": "nodule", "class_names": ["no nodule", "nodule"]},
            {
                "name": "lungs",
                "kind": "segmentation",
                "class_names": ["background", "lung", "nodule"],
                "head": {"aspp_channels": 8},
            },
        ],
    },
}


def result_row(
    backbone: str,
    protocol: str,
    run: int,
    value: float,
    fraction: float = 1.0,
    task: str = "nodule",
    metric: str = "roc_auc",
) -> dict:
    """A `medhub evaluate` results.jsonl row (`metric` = `value` on `task`), with the fields its statistics read."""
    return {
        "task": task,
        "protocol": protocol,
        "fraction": fraction,
        "backbone": backbone,
        "run": run,
        "metrics": {metric: value},
    }


def xray_manifest(folder: Path, n_xray: int = 8) -> Path:
    return generate(folder, seed=0, n_xray=n_xray, n_ct=0, n_mri=0, n_pathology=0, progress=False)


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


REPO_ROOT = Path(__file__).resolve().parents[1]
MEDHUB = os.path.join(os.path.dirname(sys.executable), "medhub")  # the installed console script


def torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (gloo on CPU), offline, one thread per process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def rank_results(folder: Path, script: str, result: str = "result") -> list[dict]:
    """Run `script` under `torchrun` on 2 ranks (it calls `training.distributed.init_distributed()` and leaves
    a JSON-able dict in the variable `result`); every rank's dict, in rank order."""
    path = folder / "rank_script.py"
    path.write_text(
        f"{script}\nimport json, os, sys\n"
        f'with open(os.path.join(sys.argv[1], f"rank{{info.rank}}.json"), "w") as stream:\n'
        f"    json.dump({result}, stream)\n"
        "distributed.shutdown()\n"
    )
    done = torchrun([str(path), str(folder)])
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def train_on_two_ranks(recipe: str, manifest: Path, run: Path, *options: str) -> subprocess.CompletedProcess:
    """`medhub train RECIPE --preset tiny` under `torchrun` on 2 ranks; asserts that it succeeded."""
    done = torchrun(
        ["--no-python", MEDHUB, "train", recipe, "--preset", "tiny", *options]
        + ["--data", str(manifest), "--out", str(run), "--no-progress"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
