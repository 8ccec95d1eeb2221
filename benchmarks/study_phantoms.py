"""The evaluate harness's validity check on the varied X-ray phantoms (`generate_varied_xrays`): random init (a fresh
initialisation per run) vs an encoder pretrained with labels on a related phantom task (nodule classification on a
disjoint phantom set, seed 1, whose nodules are brighter, full fine-tuning from random init) vs the demo
MUSCLE encoder (`demo/muscle-resnet18-tiny-xray` from the default HF cache when `medhub demo` put it there, else
built by the demo's own recipe, `medhub demo --only muscle`, into an isolated cache `OUT/hf-cache`; never the
Hub), `--runs` runs each of the chosen protocols; prints the signal check (the finding in the processor's pixels)
and the report (mean +- sample std, Student's p vs random init).
Run: PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/study_phantoms.py [--runs 10] [--protocols linear]
     [--n 240] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from sklearn.metrics import roc_auc_score

from hub.catalogue import get_variant
from hub.data.manifest import load_manifest
from hub.data.phantoms import generate_varied_xrays
from hub.export import Provenance, export_repo
from hub.processing.processor import MedicalImageProcessor
from training.demo import run_demo
from training.evaluate.report import write_all
from training.evaluate.runner import run_study
from training.evaluate.stats import summarise
from training.evaluate.study import load_study
from training.evaluate.units import backbone_repo
from training.finetune import default_task, finetune, load_head_model
from training.heads import encoder_of

VARIANT = "muscle-resnet18-tiny"
DEMO = "demo/muscle-resnet18-tiny-xray"
# the related task: the same anatomy and acquisition, conspicuous nodules (the study's task keeps the defaults)
RELATED_FINDING = {"contrast": 2250.0}
RELATED_EPOCHS = 20


def related_encoder(work: Path, n: int) -> Path:
    """The tiny MUSCLE encoder after full fine-tuning on the nodule label of a disjoint, easier phantom set."""
    folder = work / "related"
    if (folder / "config.json").is_file():
        return folder
    manifest = generate_varied_xrays(work / "related-phantoms", n=n, seed=1, progress=False, **RELATED_FINDING)
    start = backbone_repo(f"random:{VARIANT}", work / "backbones")
    processor = MedicalImageProcessor.from_pretrained(start)
    task = default_task("classification", manifest, processor.modality, "nodule")
    config = work / "related.yaml"
    config.write_text(yaml.safe_dump({"classification": {"epochs": RELATED_EPOCHS, "patience": RELATED_EPOCHS}}))
    result = finetune(start, task, manifest, work / "related-run", preset="tiny", config_file=config, progress=False)
    head = load_head_model(result.repo_dir, task, 0)
    variant = get_variant(VARIANT)
    return export_repo(
        encoder_of(head),
        folder,
        variant=VARIANT,
        processor=variant.build_processor(),
        modality=variant.modality,
        overwrite=True,
        provenance=Provenance(kind="trained", description="nodule classification on phantom seed 1"),
    )


def demo_encoder(out: Path) -> Path:
    """The snapshot folder of the demo MUSCLE encoder: the default HF cache's, else `OUT/hf-cache`'s, built there
    by `medhub demo --only muscle`'s recipe when neither holds it (a few minutes on a 2-core CPU)."""
    isolated = out / "hf-cache"
    for cache in (None, isolated):
        try:
            snapshot = Path(snapshot_download(DEMO, cache_dir=cache, local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            continue
        print(f"demo arm: {DEMO} from {'the default HF cache' if cache is None else isolated}")
        return snapshot
    print(f"demo arm: {DEMO} is in no cache; building it (medhub demo --only muscle) into {isolated}")
    org, _ = DEMO.split("/")
    run_demo(out / "demo", org=org, progress=False, only="muscle", cache_dir=isolated)
    return Path(snapshot_download(DEMO, cache_dir=isolated, local_files_only=True))


def pixel_signal(manifest: Path) -> float:
    """AUC of the nodule label from the processor's 64 px pixels alone: the brightest 3x3 mean inside the (eroded)
    lung mask above the lung's median. Near 1 means the finding survives the preprocessing; the harness's job is
    whether an encoder's pooled features carry it."""
    rows = load_manifest(manifest)
    processor = get_variant(VARIANT).build_processor()
    pixels = processor([str(manifest.parent / r.path) for r in rows], return_tensors="pt")["pixel_values"][:, :1]
    masks = processor([str(manifest.parent / r.mask) for r in rows], return_tensors="pt")["pixel_values"][:, :1]
    lung = masks > masks.amin((2, 3), keepdim=True) + 1e-3
    lung = -torch.nn.functional.max_pool2d(-lung.float(), 5, 1, 2) > 0.5
    local = torch.nn.functional.avg_pool2d(pixels, 3, 1, 1)
    scores = [float(v[m].max() - v[m].median()) for v, m in zip(local, lung)]
    return float(roc_auc_score([r.labels["nodule"] for r in rows], scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--n", type=int, default=240, help="phantoms per set (60 %% train, 20 %% val, 20 %% test)")
    parser.add_argument("--protocols", nargs="+", default=["linear"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="study-phantoms-"))
    out.mkdir(parents=True, exist_ok=True)
    manifest = generate_varied_xrays(out / "phantoms", n=args.n, seed=0, progress=False)
    print(f"signal check: brightest spot in the lungs at the 64 px input, AUC {pixel_signal(manifest):.3f}")
    backbones = {
        "random": f"random:{VARIANT}",
        "related": str(related_encoder(out, args.n)),
        "muscle-demo": str(demo_encoder(out)),
    }
    study = {
        "backbones": backbones,
        "baseline": "random",
        "protocols": args.protocols,
        "runs": args.runs,
        "label_fractions": args.fractions,
        "tasks": {"nodule": {"manifest": str(manifest), "kind": "classification", "label": "nodule"}},
    }
    (out / "study.yaml").write_text(yaml.safe_dump(study))
    rows = run_study(load_study(out / "study.yaml"), out / "results", resume=True)
    write_all(summarise(rows, "random"), rows, "random", out / "results")
    print((out / "results" / "report.md").read_text())
    print(f"figures and summary.csv in {out / 'results'}")


if __name__ == "__main__":
    main()
