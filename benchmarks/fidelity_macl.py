"""MACL fidelity on the CT phantoms: Dice of the tiny 2D U-Net (macl-tiny) fine-tuned with 10% of the labelled
training volumes, from MACL pretraining vs from scratch, on held-out volumes.

One phantom set (seed 0) of CT volumes (32 slices each) is split into training, validation and test volumes.
MACL pretrains on every slice of the training volumes, labels unused (`medhub train macl`'s recipe and export).
Fine-tuning, as the paper's label budget, takes 10% of the training volumes (at least one; every slice of them)
with their masks (background and body -> background, liver, lesion), picked per seed, and starts either from the
pretrained repo (`training.finetune.load_head_model`: encoder and all four decoder up-blocks, new 1x1 head) or
from a random init of the same network; both run `training.finetune.Finetuner` (Adam, Dice + cross-entropy,
cosine, the weights of the lowest validation loss kept). Dice is pooled over every slice of the test volumes on
the model's 64x64 grid. Pretraining runs once (seed 0); the seeds vary the labelled volumes and the fine-tuning.
The pretraining line also prints the global loss next to its value for identical embeddings ((0.1 / 0.07) x
ln(2 x batch - 1)): a global loss at that value means the image-level embeddings have collapsed.
Run: .venv/bin/python benchmarks/fidelity_macl.py [--volumes 16] [--pretrain-steps 400] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from huggingface_hub.utils import disable_progress_bars
from safetensors.torch import load_file

from hub.catalogue import get_variant
from hub.data.manifest import ManifestRow, load_manifest, write_manifest
from hub.data.phantoms import generate
from hub.io import read_image
from hub.models.macl import MaclForSemanticSegmentation
from hub.processing.processor import MedicalImageProcessor
from training.config import load_recipe_config
from training.data import mask_to_grid
from training.distributed import DistInfo
from training.engine import Engine
from training.evaluate.report import format_p
from training.evaluate.stats import t_tests
from training.finetune import Finetuner, FinetuneSettings, FinetuneTaskSettings, TaskSpec, dice_scores, load_head_model
from training.heads import label_config
from training.launch import seed_everything
from training.recipes.macl import MaclRecipe, MaclSettings

CPU = DistInfo(0, 1, torch.device("cpu"), None)
VARIANT = "macl-tiny"
CLASSES = ("background", "liver", "lesion")
MASK_TO_CLASS = torch.tensor([0, 0, 1, 2])  # phantom mask values: 0 air, 1 body, 2 liver, 3 lesion


class SliceSegmentation:
    """Every axial slice of some labelled volumes through the variant's 2D processor, with its mask on the model
    grid: the `TaskData` interface (`__len__`, `item`) that `Finetuner` reads."""

    def __init__(self, root: Path, rows: list[ManifestRow], processor: MedicalImageProcessor):
        self.items = []
        for row in rows:
            image_path, mask_path = row.resolve(root)
            volume, mask = read_image(image_path).array, read_image(mask_path).array
            for index in range(volume.shape[0]):
                prepared = processor.prepare(np.ascontiguousarray(volume[index], dtype=np.float32))
                labels = MASK_TO_CLASS[torch.from_numpy(mask_to_grid(mask[index], prepared.record))]
                self.items.append({"pixel_values": torch.from_numpy(prepared.pixel_values), "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def item(self, index: int) -> dict:
        return self.items[index]


def split_manifest(manifest: Path, n_val: int, n_test: int) -> Path:
    """The phantom manifest with the last `n_test` volumes as test, the `n_val` before them as val, the rest train."""
    rows = load_manifest(manifest)
    splits = ["train"] * (len(rows) - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return write_manifest(
        [replace(row, split=split) for row, split in zip(rows, splits)], manifest.parent / "split.jsonl"
    )


def pretrain(manifest: Path, run_dir: Path, steps: int, batch_size: int) -> tuple[Path, list[dict]]:
    """MACL (the tiny preset's views and losses) on the training volumes' slices; the exported repo and the logged
    metrics of every step."""
    override = {
        "variant": VARIANT,
        "steps": steps,
        "optim": {"batch_size": batch_size},
        "engine": {"progress": False, "checkpoint_every": 100000, "log_every": 1},
    }
    config = run_dir.parent / "macl.yaml"
    config.write_text(yaml.safe_dump(override))
    settings = load_recipe_config(MaclSettings, "macl", "tiny", config)
    seed_everything(settings.seed)
    result = Engine(run_dir, settings.engine, CPU).run(MaclRecipe(settings, [manifest], CPU))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.exported[0], [entry for entry in logged if "loss" in entry]


def finetune_settings(tmp: Path, epochs: int, batch_size: int, lr: float) -> FinetuneTaskSettings:
    override = {
        "segmentation": {
            "epochs": epochs,
            "patience": epochs,
            "schedule": "cosine",
            "dice_weight": 1.0,
            "ce_weight": 1.0,
            "optim": {"batch_size": batch_size, "lr": lr},
        }
    }
    path = tmp / "finetune.yaml"
    path.write_text(yaml.safe_dump(override))
    return load_recipe_config(FinetuneSettings, "finetune", "tiny", path).segmentation


@torch.no_grad()
def pooled_dice(model: MaclForSemanticSegmentation, data: SliceSegmentation) -> dict[str, float]:
    model.eval()
    counts = np.zeros((3, len(CLASSES)))
    for start in range(0, len(data), 16):
        items = [data.item(i) for i in range(start, min(start + 16, len(data)))]
        predicted = model(pixel_values=torch.stack([i["pixel_values"] for i in items])).logits.argmax(1).flatten()
        true = torch.stack([i["labels"] for i in items]).flatten()
        counts[0] += torch.bincount(true[predicted == true], minlength=len(CLASSES)).numpy()
        counts[1] += torch.bincount(predicted, minlength=len(CLASSES)).numpy()
        counts[2] += torch.bincount(true, minlength=len(CLASSES)).numpy()
    return dice_scores(counts)


def loaded_tensors(model: MaclForSemanticSegmentation, repo: Path) -> tuple[int, int]:
    """How many encoder and decoder tensors of `model` equal the pretraining network's in the repo's weights file
    (the two models share these names), out of how many."""
    pretrained = load_file(repo / "model.safetensors")
    names = [name for name in model.state_dict() if name.startswith(("macl.", "decoder."))]
    return sum(name in pretrained and torch.equal(model.state_dict()[name], pretrained[name]) for name in names), len(
        names
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=16, help="CT phantoms in all (train + val + test)")
    parser.add_argument("--val", type=int, default=1, help="validation volumes (best-epoch selection)")
    parser.add_argument("--test", type=int, default=4, help="held-out test volumes (Dice)")
    parser.add_argument("--label-fraction", type=float, default=0.1, help="fraction of training volumes labelled")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--pretrain-batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    parser.add_argument("--finetune-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="fine-tuning learning rate (Adam)")
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds (labelled volumes and init)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()  # the projectors left out of the segmentation model are expected
    transformers.logging.disable_progress_bar()
    disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="fidelity_macl_"))
    start = time.perf_counter()
    phantoms = generate(tmp / "ct", seed=0, n_xray=0, n_ct=args.volumes, n_mri=0, n_pathology=0, progress=False)
    manifest = split_manifest(phantoms, args.val, args.test)
    rows = {split: [row for row in load_manifest(manifest) if row.split == split] for split in ("train", "val", "test")}
    n_labelled = max(1, round(args.label_fraction * len(rows["train"])))

    repo, logged = pretrain(manifest, tmp / "pretrain", args.pretrain_steps, args.pretrain_batch)
    pretrain_s = time.perf_counter() - start
    processor = MedicalImageProcessor.from_pretrained(repo)
    val, test = (SliceSegmentation(manifest.parent, rows[split], processor) for split in ("val", "test"))
    settings = finetune_settings(tmp, args.epochs, args.finetune_batch, args.lr)
    task = TaskSpec("segmentation", CLASSES)
    results: dict[str, list[dict[str, float]]] = {"MACL": [], "scratch": []}
    checks = []
    for seed in range(args.seeds):
        picked = torch.randperm(len(rows["train"]), generator=torch.Generator().manual_seed(seed))[:n_labelled]
        train = SliceSegmentation(manifest.parent, [rows["train"][int(i)] for i in picked], processor)
        for name in results:
            if name == "MACL":
                model = load_head_model(repo, task, seed)
                checks.append(loaded_tensors(model, repo))
            else:
                torch.manual_seed(seed)
                model = MaclForSemanticSegmentation(get_variant(VARIANT).build_config(**label_config(list(CLASSES))))
            Finetuner(model, train, val, task, settings, seed, freeze=False).run(progress=False)
            results[name].append(pooled_dice(model, test))

    window = max(1, min(10, len(logged) // 2))
    first, last = (
        {key: np.mean([e[key] for e in part]) for key in ("loss", "loss_global", "loss_dense")}
        for part in (logged[:window], logged[-window:])
    )
    uniform = 0.1 / 0.07 * np.log(2 * args.pretrain_batch - 1)  # SupCon when every embedding is the same
    print(
        f"MACL fidelity on CT phantoms: {args.volumes} volumes of 32 slices (seed 0): {len(rows['train'])} train, "
        f"{len(rows['val'])} val, {len(rows['test'])} test; variant {VARIANT} (64x64 slices)"
    )
    print(
        f"pretraining: {args.pretrain_steps} steps x batch {args.pretrain_batch} on {32 * len(rows['train'])} "
        f"unlabelled slices, {pretrain_s:.0f} s; mean of the first / last {window} steps: loss {first['loss']:.3f} / "
        f"{last['loss']:.3f}, global {first['loss_global']:.3f} / {last['loss_global']:.3f} (identical embeddings "
        f"give {uniform:.3f}), dense {first['loss_dense']:.3f} / {last['loss_dense']:.3f}"
    )
    print(
        f"fine-tuning: {n_labelled} labelled volume(s) ({32 * n_labelled} slices, "
        f"{args.label_fraction:.0%} of the training volumes) per seed, {args.epochs} epochs x batch "
        f"{args.finetune_batch}, Adam {args.lr:g}, Dice + CE; {args.seeds} seeds; pretrained tensors loaded: "
        + ", ".join(f"{same}/{total}" for same, total in checks)
    )
    print(f"{'test Dice (pooled)':22s} {'MACL':>15s} {'scratch':>15s} {'p (Welch)':>16s}")
    for metric, label in (("dice", "mean (liver, lesion)"), ("dice_class_1", "liver"), ("dice_class_2", "lesion")):
        arms = {name: np.array([r.get(metric, np.nan) for r in results[name]]) for name in results}
        cells = [f"{np.nanmean(v):.3f} ± {np.nanstd(v, ddof=1) if len(v) > 1 else np.nan:.3f}" for v in arms.values()]
        student, welch = t_tests(arms["MACL"][~np.isnan(arms["MACL"])], arms["scratch"][~np.isnan(arms["scratch"])])
        print(f"{label:22s} {cells[0]:>15s} {cells[1]:>15s} {format_p(student):>7s} ({format_p(welch)})")
    print("std: sample (ddof 1) over seeds; p: two-sample Student's t-test over seeds, MACL vs scratch (Welch's)")
    print(
        f"liver Dice per seed: MACL {[round(r['dice_class_1'], 3) for r in results['MACL']]}, "
        f"scratch {[round(r['dice_class_1'], 3) for r in results['scratch']]}"
    )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
