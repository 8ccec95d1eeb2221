"""MUSCLE fidelity on the X-ray phantoms: linear-probe AUC (nodule label, frozen encoder) of the tiny ResNet after
MoCo pretraining vs random init, and after the full MUSCLE run vs MUSCLE-- (continual without L2-SP and without
reshuffling) on the earliest task (nodule classification) after the last round.

Pretraining uses one phantom set (seed 0); the probe uses a held-out phantom set (seed 1): pooled encoder features,
a logistic regression, AUC by stratified 5-fold cross-validation. Seeds are fixed, so the table is reproducible.
Run: .venv/bin/python benchmarks/fidelity_muscle.py [--n-xray 48]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hub.data.phantoms import generate
from training.config import load_recipe_config
from training.data import ManifestDataset, Target, read_split
from training.distributed import DistInfo
from training.engine import Engine, Stage
from training.launch import seed_everything
from training.recipes.muscle import MuscleRecipe, MuscleSettings

CPU = DistInfo(0, 1, torch.device("cpu"), None)
TASKS = [  # nodule classification first: the earliest task of MUSCLE-- (configured order every round)
    {"name": "nodule-classification", "kind": "classification", "label": "nodule", "class_names": ["no nodule", "nodule"]},
    {"name": "lung-segmentation", "kind": "segmentation", "class_names": ["background", "lung", "nodule"],
     "head": {"aspp_channels": 16}},
]


class _NoExport(MuscleRecipe):
    """The MUSCLE recipe without the repo export (the benchmark reads the encoder in memory)."""

    def export(self, out_dir: Path) -> list[Path]:
        return []


class _MocoOnly(_NoExport):
    def stages(self) -> list[Stage]:
        return super().stages()[:1]


def settings_for(tmp: Path, name: str, moco_steps: int, rounds: int, steps_per_task: int, **continual) -> MuscleSettings:
    override = {
        "engine": {"progress": False, "checkpoint_every": 100000, "log_every": 1000},
        "moco": {"steps": moco_steps, "queue_size": 64, "optim": {"batch_size": 8}},
        "continual": {"rounds": rounds, "steps_per_task": steps_per_task, "optim": {"batch_size": 8},
                      "tasks": TASKS, **continual},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return load_recipe_config(MuscleSettings, "muscle", "tiny", path)


def trained_encoder(cls: type, settings: MuscleSettings, manifest: Path, run_dir: Path | None) -> MuscleRecipe:
    seed_everything(settings.seed)
    recipe = cls(settings, [manifest], CPU)
    if run_dir is not None:
        Engine(run_dir, settings.engine, CPU).run(recipe)
    return recipe


@torch.no_grad()
def features(recipe: MuscleRecipe, probe: ManifestDataset) -> np.ndarray:
    recipe.encoder.eval()
    pixels = torch.stack([probe.sample(i)["pixel_values"] for i in range(len(probe))])
    return recipe.encoder(pixel_values=pixels).pooler_output.flatten(1).numpy()


def probe_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-xray", type=int, default=48)
    parser.add_argument("--moco-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-task", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="fidelity_muscle_"))
    start = time.perf_counter()
    pretrain = generate(tmp / "pretrain", seed=0, n_xray=args.n_xray, n_ct=0, n_mri=0, n_pathology=0, progress=False)
    held_out = generate(tmp / "probe", seed=1, n_xray=args.n_xray, n_ct=0, n_mri=0, n_pathology=0, progress=False)

    runs = {
        "random init": (_NoExport, settings_for(tmp, "random", args.moco_steps, args.rounds, args.steps_per_task), False),
        "MoCo only": (_MocoOnly, settings_for(tmp, "moco", args.moco_steps, args.rounds, args.steps_per_task), True),
        "MUSCLE (L2-SP, reshuffled)": (_NoExport, settings_for(tmp, "muscle", args.moco_steps, args.rounds,
                                                                args.steps_per_task), True),
        "MUSCLE-- (no L2-SP, fixed order)": (_NoExport, settings_for(tmp, "minus", args.moco_steps, args.rounds,
                                                                      args.steps_per_task, l2sp=False, reshuffle=False),
                                             True),
    }
    probe = None
    rows = []
    for label, (cls, settings, train) in runs.items():
        recipe = trained_encoder(cls, settings, pretrain, tmp / label.split()[0] if train else None)
        if probe is None:
            probe = ManifestDataset(read_split(held_out, "train", "xray"), recipe.processor,
                                    Target("classification", ("no nodule", "nodule"), "nodule"))
            y = np.array([int(probe.sample(i)["labels"]) for i in range(len(probe))])
        rows.append((label, probe_auc(features(recipe, probe), y)))

    print(f"MUSCLE fidelity on X-ray phantoms: pretrain {args.n_xray} X-rays (seed 0), probe {len(y)} held-out "
          f"X-rays (seed 1, {int(y.sum())} with nodule), variant muscle-resnet18-tiny, seed 0")
    print(f"MoCo {args.moco_steps} steps x batch 8; continual {args.rounds} rounds x {len(TASKS)} tasks x "
          f"{args.steps_per_task} steps x batch 8; earliest task = nodule-classification")
    print(f"{'encoder':36s} {'linear-probe AUC (5-fold CV)':>28s}")
    for label, auc in rows:
        print(f"{label:36s} {auc:28.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
