"""The evaluate harness's validity check on the varied X-ray phantoms (`generate_varied_xrays`): random init vs an
encoder pretrained with labels on a related phantom task (the nodule task on a disjoint phantom set, seed 1, full
fine-tuning) vs the demo MUSCLE encoder (`demo/muscle-resnet18-tiny` in the HF cache, when `medhub demo` built it),
`--runs` runs each of the chosen protocols; prints the report (mean +- sample std, Student's p vs random init).
Run: .venv/bin/python benchmarks/study_phantoms.py [--runs 10] [--protocols linear] [--n 80] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from hub.catalogue import get_variant
from hub.data.phantoms import generate_varied_xrays
from hub.errors import MedhubError
from hub.export import Provenance, export_repo, resolve_repo
from hub.processing.processor import MedicalImageProcessor
from training.evaluate.report import write_all
from training.evaluate.runner import run_study
from training.evaluate.stats import summarise
from training.evaluate.study import load_study
from training.evaluate.units import backbone_repo
from training.finetune import default_task, finetune, load_head_model
from training.heads import encoder_of

VARIANT = "muscle-resnet18-tiny"


def related_encoder(work: Path, n: int) -> Path:
    """The tiny MUSCLE encoder after full fine-tuning on the nodule label of a disjoint phantom set."""
    folder = work / "related"
    if (folder / "config.json").is_file():
        return folder
    manifest = generate_varied_xrays(work / "related-phantoms", n=n, seed=1, progress=False)
    start = backbone_repo(f"random:{VARIANT}", work / "backbones")
    processor = MedicalImageProcessor.from_pretrained(start)
    task = default_task("classification", manifest, processor.modality, "nodule")
    result = finetune(start, task, manifest, work / "related-run", preset="tiny", progress=False)
    head = load_head_model(result.repo_dir, task, 0)
    variant = get_variant(VARIANT)
    return export_repo(encoder_of(head), folder, variant=VARIANT, processor=variant.build_processor(),
                       modality=variant.modality, overwrite=True,
                       provenance=Provenance(kind="trained", description="nodule classification on phantom seed 1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--n", type=int, default=80, help="phantoms per set")
    parser.add_argument("--protocols", nargs="+", default=["linear"])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="study-phantoms-")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = generate_varied_xrays(args.out / "phantoms", n=args.n, seed=0, progress=False)
    backbones = {"random": f"random:{VARIANT}", "related": str(related_encoder(args.out, args.n))}
    try:
        backbones["muscle-demo"] = str(resolve_repo("demo/muscle-resnet18-tiny"))
    except MedhubError:
        print("demo/muscle-resnet18-tiny is not in the HF cache (run medhub demo): the demo arm is left out")
    study = {"backbones": backbones, "baseline": "random", "protocols": args.protocols, "runs": args.runs,
             "label_fractions": [1.0],
             "tasks": {"nodule": {"manifest": str(manifest), "kind": "classification", "label": "nodule"}}}
    (args.out / "study.yaml").write_text(yaml.safe_dump(study))
    loaded = load_study(args.out / "study.yaml")
    rows = run_study(loaded, args.out / "results", resume=True)
    write_all(summarise(rows, "random"), rows, "random", args.out / "results")
    print((args.out / "results" / "report.md").read_text())
    print(f"figures and summary.csv in {args.out / 'results'}")


if __name__ == "__main__":
    main()
