"""MUSCLE fidelity on the X-ray phantoms: linear-probe AUC (nodule label, frozen encoder) of the tiny ResNet after
MoCo pretraining (and after 4x as many MoCo steps) vs random init, and after the full MUSCLE run vs MUSCLE--
(continual without L2-SP and without reshuffling) on the earliest task (nodule classification) after the last round.

Seed s pretrains on one phantom set (phantom seed 2s, training seed s) and probes a held-out phantom set (phantom
seed 2s + 1): pooled encoder features, a logistic regression, AUC by stratified 5-fold cross-validation. The table
gives mean ± sample std over the seeds, the per-seed values and the two-sample t-test against random init (the
evaluate harness's Student's and Welch's p); seed 0 is the former single-seed table. Next to the AUC:
the mean pairwise cosine of the pooled probe features and their effective rank (exp of the entropy of the
normalised singular values of the centred features), to see a collapse. The MoCo line prints the InfoNCE loss
(first step, which scores against the random initial queue, and mean of the last 10 steps) next to its value at
chance, ln(queue + 1), and the pixel distance between the two MoCo views of an image beside the distance between
two different images: when augmentation moves an image further than the images differ, instance discrimination
cannot be learnt and the loss stays near chance.
Run: .venv/bin/python benchmarks/fidelity_muscle.py [--n-xray 48] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
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
from training.data import ManifestDataset, Target, augment, read_split, sample_generator
from training.demo import MUSCLE_TASKS
from training.distributed import DistInfo
from training.engine import Engine, Stage
from training.evaluate.report import format_p
from training.evaluate.stats import t_tests
from training.launch import seed_everything
from training.recipes.muscle import MuscleRecipe, MuscleSettings

CPU = DistInfo(0, 1, torch.device("cpu"), None)
QUEUE = 64
LONG = 4  # the long MoCo arm runs LONG x --moco-steps


class _NoExport(MuscleRecipe):
    """The MUSCLE recipe without the repo export (the benchmark reads the encoder in memory)."""

    def export(self, out_dir: Path) -> list[Path]:
        return []


class _MocoOnly(_NoExport):
    def stages(self) -> list[Stage]:
        return super().stages()[:1]


def settings_for(
    tmp: Path, name: str, seed: int, moco_steps: int, rounds: int, steps_per_task: int, **continual
) -> MuscleSettings:
    override = {
        "seed": seed,
        "engine": {"progress": False, "checkpoint_every": 100000, "log_every": 1},
        "moco": {"steps": moco_steps, "queue_size": QUEUE, "optim": {"batch_size": 8}},
        "continual": {
            "rounds": rounds,
            "steps_per_task": steps_per_task,
            "optim": {"batch_size": 8},
            "tasks": MUSCLE_TASKS,
            **continual,
        },
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


def moco_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if record["stage"] == "moco"]


@torch.no_grad()
def view_distances(recipe: MuscleRecipe) -> tuple[float, float]:
    """(mean pixel L2 between the two MoCo views of an image, mean L2 between two different un-augmented images)."""
    dataset, settings = recipe.pretrain_sets[0], recipe.settings.moco.augment
    raw = torch.stack([dataset.sample(i)["pixel_values"] for i in range(len(dataset))]).flatten(1)
    views = [
        torch.stack(
            [
                augment(dataset.sample(i), settings, sample_generator(0, 0, 0, i, view))["pixel_values"]
                for i in range(len(dataset))
            ]
        ).flatten(1)
        for view in (0, 1)
    ]
    between = torch.cdist(raw, raw)[~torch.eye(len(raw), dtype=torch.bool)]
    return float((views[0] - views[1]).norm(dim=1).mean()), float(between.mean())


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


def collapse(x: np.ndarray) -> tuple[float, float]:
    """(mean pairwise cosine of the feature rows, effective rank of the centred features)."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    cosine = float(((unit @ unit.T).sum() - n) / (n * n - n))
    singular = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = singular / singular.sum()
    return cosine, float(np.exp(-(p * np.log(p + 1e-12)).sum()))


def run_seed(tmp: Path, seed: int, args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Every arm for one seed: ({label: {"auc", "cosine", "rank", "losses" (MoCo arms, else None)}},
    {"views": view_distances, "probe": (probe images, with nodule)})."""
    xrays = {"n_xray": args.n_xray, "n_ct": 0, "n_mri": 0, "n_pathology": 0, "progress": False}
    pretrain = generate(tmp / f"pretrain{seed}", seed=2 * seed, **xrays)
    held_out = generate(tmp / f"probe{seed}", seed=2 * seed + 1, **xrays)
    common = (args.rounds, args.steps_per_task)
    arms = {
        "random init": (_NoExport, settings_for(tmp, "random", seed, args.moco_steps, *common), False),
        "MoCo only": (_MocoOnly, settings_for(tmp, "moco", seed, args.moco_steps, *common), True),
        f"MoCo only ({LONG}x steps)": (
            _MocoOnly,
            settings_for(tmp, "long", seed, LONG * args.moco_steps, *common),
            True,
        ),
        "MUSCLE (L2-SP, reshuffled)": (_NoExport, settings_for(tmp, "muscle", seed, args.moco_steps, *common), True),
        "MUSCLE-- (no L2-SP, fixed order)": (
            _NoExport,
            settings_for(tmp, "minus", seed, args.moco_steps, *common, l2sp=False, reshuffle=False),
            True,
        ),
    }
    results: dict[str, dict] = {}
    checks: dict[str, tuple] = {}
    probe = y = None
    for number, (label, (cls, settings, train)) in enumerate(arms.items()):
        run_dir = tmp / f"seed{seed}-arm{number}"
        recipe = trained_encoder(cls, settings, pretrain, run_dir if train else None)
        if probe is None:
            probe = ManifestDataset(
                read_split(held_out, "train", "xray"),
                recipe.processor,
                Target("classification", ("no nodule", "nodule"), "nodule"),
            )
            y = np.array([int(probe.sample(i)["labels"]) for i in range(len(probe))])
            checks = {"views": view_distances(recipe), "probe": (len(y), int(y.sum()))}
        x = features(recipe, probe)
        cosine, rank = collapse(x)
        results[label] = {
            "auc": probe_auc(x, y),
            "cosine": cosine,
            "rank": rank,
            "losses": moco_losses(run_dir) if cls is _MocoOnly else None,
        }
    return results, checks


def compared(values: np.ndarray, base: np.ndarray) -> str:
    """Student's p (Welch's in brackets) of `values` against `base`, as the evaluate report prints them."""
    student, welch = t_tests(values, base)
    return f"{format_p(student)} ({format_p(welch)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-xray", type=int, default=48)
    parser.add_argument("--moco-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-task", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (phantom draws and training)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="fidelity_muscle_"))
    start = time.perf_counter()
    per_seed, checks = zip(*(run_seed(tmp, seed, args) for seed in range(args.seeds)))
    labels = list(per_seed[0])

    probes = ", ".join(f"{n} ({positive} with nodule)" for n, positive in (c["probe"] for c in checks))
    print(
        f"MUSCLE fidelity on X-ray phantoms: {args.seeds} seeds; seed s pretrains on {args.n_xray} X-rays (phantom "
        f"seed 2s, training seed s) and probes held-out X-rays (phantom seed 2s+1): {probes}; "
        f"variant muscle-resnet18-tiny"
    )
    print(
        f"MoCo {args.moco_steps} steps (long arm {LONG * args.moco_steps}) x batch 8, queue {QUEUE}; continual "
        f"{args.rounds} rounds x {len(MUSCLE_TASKS)} tasks x {args.steps_per_task} steps x batch 8; earliest task = "
        f"{MUSCLE_TASKS[0]['name']}"
    )
    width = max(8, 6 * args.seeds + 1)
    print(
        f"{'encoder':36s} {'probe AUC mean ± std':>21s}  {'per seed':{width}s} {'feature cos':>11s} {'eff. rank':>9s}"
        f" {'p vs random (Welch)':>20s}"
    )
    aucs = {label: np.array([seed[label]["auc"] for seed in per_seed]) for label in labels}
    for label in labels:
        rows = [seed[label] for seed in per_seed]
        auc = aucs[label]
        per = "[" + " ".join(f"{a:.3f}" for a in auc) + "]"
        cosine, rank = np.mean([r["cosine"] for r in rows]), np.mean([r["rank"] for r in rows])
        shown = "baseline" if label == "random init" else compared(auc, aucs["random init"])
        std = auc.std(ddof=1) if len(auc) > 1 else float("nan")
        print(f"{label:36s} {auc.mean():13.3f} ± {std:.3f}  {per:{width}s} {cosine:11.3f} {rank:9.1f} {shown:>20s}")
    muscle, minus = aucs["MUSCLE (L2-SP, reshuffled)"], aucs["MUSCLE-- (no L2-SP, fixed order)"]
    print(
        f"std: sample (ddof 1) over seeds; p: two-sample Student's t-test over seeds (Welch's in brackets). "
        f"MUSCLE vs MUSCLE--: difference {muscle.mean() - minus.mean():+.3f}, p {compared(muscle, minus)}"
    )
    for label in labels:
        losses = [seed[label]["losses"] for seed in per_seed if seed[label]["losses"]]
        if losses:
            first, last = np.mean([run[0] for run in losses]), np.mean([np.mean(run[-10:]) for run in losses])
            print(
                f"{label} InfoNCE (mean over seeds): first step {first:.3f}, last 10 steps {last:.3f}; "
                f"chance ln({QUEUE}+1) = {np.log(QUEUE + 1):.3f}"
            )
    same, different = np.mean([c["views"] for c in checks], axis=0)
    print(f"pixel L2 between the two MoCo views of an image {same:.1f}, between two different images {different:.1f}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
