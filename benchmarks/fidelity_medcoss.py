"""MedCoSS fidelity on the phantoms, the paper's Fig. 5 in miniature: three stages (report text -> X-ray -> CT) of
plain sequential pretraining vs MedCoSS (k-means rehearsal buffer, feature distillation after mixup), and how much
each loses on the earlier stages.

Both arms train medcoss-tiny on the same phantom set (seed 0: the X-rays' reports, the X-rays, CT volumes) with the
same seeds; they differ only in `rehearsal.enabled`. At initialisation and at the end of every stage the encoder is
measured on a held-out phantom set (seed 1), twice:
- linear probe: frozen encoder (eval mode, `pooler_output`), text task = report -> nodule label, X-ray task =
  image -> nodule label; standardised features, a logistic regression, AUC by stratified 5-fold cross-validation;
- pretext loss: the held-out MLM loss (text; fixed whole-word masks) or MAE loss (X-ray; fixed patch masks) of the
  current encoder read out by the MLM head / MAE decoder as they were at the end of the task's own stage (the
  heads are re-initialised at every stage). Unlike the probe AUC, it does not saturate on templated reports.
Forgetting = the score after the task's own stage minus the score after the last stage (for the loss: the rise).
Run: .venv/bin/python benchmarks/fidelity_medcoss.py [--steps-per-stage 300 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections import Counter
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
from hub.models.medcoss import MedCossForPreTraining
from training.config import load_recipe_config
from training.data import ManifestDataset, read_split, sample_generator
from training.distributed import DistInfo
from training.engine import Engine, Stage
from training.evaluate.report import format_p
from training.evaluate.stats import t_tests
from training.launch import seed_everything
from training.recipes.medcoss import MedCossRecipe, MedCossSettings, ModalityStage, modality_processor
from training.text import encode, whole_word_mask

CPU = DistInfo(0, 1, torch.device("cpu"), None)
STAGES = ["text", "xray", "ct"]
TASKS = ["text", "xray"]
ARMS = {"plain sequential": False, "MedCoSS": True}


class HeldOut:
    """The held-out X-ray phantoms: their reports (text task) and images (X-ray task), both labelled by nodule."""

    def __init__(self, manifest: Path):
        self.rows = read_split(manifest, "train", "xray")
        self.texts = [row.text for _, row in self.rows.rows]
        self.labels = np.array([int(row.labels["nodule"]) for _, row in self.rows.rows])
        self.images: ManifestDataset | None = None

    def inputs(self, recipe: MedCossRecipe) -> dict[str, dict[str, torch.Tensor]]:
        """Model inputs per task: text (+ fixed whole-word masks and MLM labels), pixels (+ fixed MAE noise)."""
        config = recipe.network.model.config
        if self.images is None:
            self.images = ManifestDataset(self.rows, modality_processor("xray", config))
        tokenizer = recipe.tokenizer
        encoded = encode(tokenizer, self.texts, recipe.settings.text_length)
        masked, labels = zip(
            *(
                whole_word_mask(
                    encoded.input_ids[i],
                    encoded.word_ids[i],
                    tokenizer.mask_token_id,
                    len(tokenizer),
                    sample_generator(1, i),
                    recipe.settings.mlm_probability,
                )
                for i in range(len(self.texts))
            )
        )
        pixels = torch.stack([self.images[i]["pixel_values"] for i in range(len(self.images))])
        patches = math.prod(recipe.network.model.medcoss.image_embeddings.check(pixels))
        noise = torch.rand(len(pixels), patches, generator=torch.Generator().manual_seed(1))
        return {
            "text": {
                "input_ids": encoded.input_ids,
                "attention_mask": encoded.attention_mask,
                "masked_ids": torch.stack(masked),
                "labels": torch.stack(labels),
            },
            "xray": {"pixel_values": pixels, "noise": noise},
        }

    @torch.no_grad()
    def measure(
        self, recipe: MedCossRecipe, model: MedCossForPreTraining, heads: dict[str, MedCossForPreTraining]
    ) -> dict[str, float]:
        """Probe AUC per task, and `loss-<task>` for the tasks whose own stage has ended (`heads`)."""
        inputs = self.inputs(recipe)
        encoder = model.medcoss.eval()
        text, xray = inputs["text"], inputs["xray"]
        features = {
            "text": encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output,
            "xray": encoder(pixel_values=xray["pixel_values"]).pooler_output,
        }
        out = {task: probe_auc(x.numpy(), self.labels) for task, x in features.items()}
        for task, head in heads.items():
            reader = copy.deepcopy(head).eval()
            reader.medcoss.load_state_dict(encoder.state_dict())
            if task == "text":
                loss = reader(
                    input_ids=text["masked_ids"], attention_mask=text["attention_mask"], labels=text["labels"]
                ).loss
            else:
                loss = reader(pixel_values=xray["pixel_values"], noise=xray["noise"]).loss
            out[f"loss-{task}"] = float(loss)
        return out


def probe_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


class _ProbedStage(ModalityStage):
    """A MedCoSS stage that counts where its batches came from and measures the model after its last step."""

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super().loss(step)
        source = "current" if metrics["source"] == 0 else f"{self.sources()[int(metrics['source'])][0]} buffer"
        self.recipe.draws[self.modality][source] += 1
        return loss, metrics

    def after_step(self, step: int) -> None:
        if step + 1 < self.num_steps:
            return
        recipe = self.recipe
        if self.modality in TASKS:
            recipe.heads[self.modality] = copy.deepcopy(self.model)
        recipe.scores[self.modality] = recipe.held_out.measure(recipe, self.model, recipe.heads)


class _ProbedRecipe(MedCossRecipe):
    """The MedCoSS recipe measured at initialisation and at the end of every stage, without the repo export."""

    def __init__(self, settings: MedCossSettings, manifests: list[Path], held_out: HeldOut):
        super().__init__(settings, manifests, CPU)
        self.held_out = held_out
        self.heads: dict[str, MedCossForPreTraining] = {}
        self.draws = {modality: Counter() for modality in settings.stages}
        self.scores = {"init": held_out.measure(self, self.network.model, {})}

    def stages(self) -> list[Stage]:
        return [_ProbedStage(index, self) for index in range(len(self.settings.stages))]

    def export(self, out_dir: Path) -> list[Path]:
        return []


def settings_for(tmp: Path, seed: int, rehearsal: bool, args: argparse.Namespace) -> MedCossSettings:
    override = {
        "seed": seed,
        "stages": STAGES,
        "steps_per_stage": args.steps_per_stage,
        "engine": {"progress": False, "checkpoint_every": 10**9, "log_every": 10**9},
        "optim": {"batch_size": args.batch_size, "lr": args.lr, "warmup_steps": max(1, args.steps_per_stage // 10)},
        "rehearsal": {"enabled": rehearsal, "buffer_ratio": args.buffer_ratio, "center_ratio": args.center_ratio},
    }
    path = tmp / f"seed{seed}-{rehearsal}.yaml"
    path.write_text(yaml.safe_dump(override))
    return load_recipe_config(MedCossSettings, "medcoss", "tiny", path)


def run_arm(
    tmp: Path, manifest: Path, held_out: HeldOut, seed: int, rehearsal: bool, args: argparse.Namespace
) -> _ProbedRecipe:
    settings = settings_for(tmp, seed, rehearsal, args)
    seed_everything(seed)
    recipe = _ProbedRecipe(settings, [manifest], held_out)
    Engine(tmp / f"run-{seed}-{rehearsal}", settings.engine, CPU).run(recipe)
    return recipe


def mean_std(values: list[float]) -> str:
    """Mean ± sample std (ddof 1) over the seeds."""
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def print_table(title: str, results: dict[str, list[dict[str, dict[str, float]]]], key: str, sign: int) -> None:
    """One row per arm and task: at init (probe only), after the task's own stage, after the last stage, forgetting."""
    print(title)
    print(
        f"{'arm':18s} {'task':6s} {'at init':>15s} {'after own stage':>17s} {'after last stage':>17s} "
        f"{'forgetting':>15s}"
    )
    forgetting: dict[tuple[str, str], np.ndarray] = {}
    for arm, runs in results.items():
        for task in TASKS:
            name = key.format(task=task)
            init = mean_std([r["init"][name] for r in runs]) if name in runs[0]["init"] else "-"
            own = [r[task][name] for r in runs]
            last = [r[STAGES[-1]][name] for r in runs]
            forgetting[arm, task] = np.array([sign * (a - b) for a, b in zip(own, last)])
            print(
                f"{arm:18s} {task:6s} {init:>15s} {mean_std(own):>17s} {mean_std(last):>17s} "
                f"{mean_std(list(forgetting[arm, task])):>15s}"
            )
    plain, medcoss = ARMS
    for task in TASKS:
        student, welch = t_tests(forgetting[medcoss, task], forgetting[plain, task])
        difference = forgetting[medcoss, task].mean() - forgetting[plain, task].mean()
        print(
            f"{task} forgetting, {medcoss} - {plain}: {difference:+.3f}; two-sample t-test over seeds: "
            f"Student's p {format_p(student)}, Welch's {format_p(welch)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-xray", type=int, default=160, help="X-ray phantoms (each with its report) per set")
    parser.add_argument("--n-ct", type=int, default=40)
    parser.add_argument("--steps-per-stage", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3, help="the tiny preset's 1e-3 barely trains the MLM here")
    parser.add_argument("--buffer-ratio", type=float, default=0.05)
    parser.add_argument("--center-ratio", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: a second thread only adds contention on a shared CPU
    tmp = Path(tempfile.mkdtemp(prefix="fidelity_medcoss_"))
    start = time.perf_counter()
    manifest = generate(
        tmp / "pretrain", seed=0, n_xray=args.n_xray, n_ct=args.n_ct, n_mri=0, n_pathology=0, progress=False
    )
    held_out = HeldOut(
        generate(tmp / "probe", seed=1, n_xray=args.n_xray, n_ct=0, n_mri=0, n_pathology=0, progress=False)
    )
    pretrain_labels = [int(row.labels["nodule"]) for _, row in read_split(manifest, "train", "xray").rows]
    results: dict[str, list[dict[str, dict[str, float]]]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm, rehearsal in ARMS.items():
            recipe = run_arm(tmp, manifest, held_out, seed, rehearsal, args)
            results[arm].append(recipe.scores)
            buffers = (
                ", ".join(
                    f"{m} {len(v)} ({sum(pretrain_labels[i] for i in v)} with nodule)"
                    for m, v in recipe.buffers.items()
                )
                or "none"
            )
            draws = "; ".join(
                f"{m}: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items())) for m, c in recipe.draws.items()
            )
            print(f"seed {seed} {arm}: buffers {buffers}; batches per stage {draws}", flush=True)

    y = held_out.labels
    print()
    print(
        f"MedCoSS fidelity (Fig. 5 in miniature): medcoss-tiny, stages {' -> '.join(STAGES)}, "
        f"{args.steps_per_stage} steps x batch {args.batch_size} each, lr {args.lr:g}, seeds {args.seeds}"
        + (" (mean ± sample std)" if len(args.seeds) > 1 else "")
    )
    print(
        f"pretrain: phantom set seed 0 ({args.n_xray - 2} X-rays with reports, {args.n_ct - 2} CT in the train "
        f"split); MedCoSS buffers: ratio {args.buffer_ratio:g}, centres {args.center_ratio:g}"
    )
    print(f"held out: phantom set seed 1 ({len(y)} X-rays and their reports, {int(y.sum())} with nodule)")
    print()
    print_table("linear-probe AUC, nodule label (5-fold CV); forgetting = own - last", results, "{task}", 1)
    print()
    print_table(
        "held-out pretext loss with the own stage's head (text MLM, X-ray MAE); forgetting = last - own",
        results,
        "loss-{task}",
        -1,
    )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
