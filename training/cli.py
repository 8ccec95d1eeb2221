"""`medhub train`, `medhub finetune` and `medhub demo`, contributed through the `medhub.commands` entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

from .recipes import RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="pretrain a family with its recipe (single process or torchrun)")
    train.add_argument(
        "recipe", choices=sorted(RECIPES), help="; ".join(f"{e.name}: {e.help}" for e in RECIPES.values())
    )
    train.add_argument(
        "--preset",
        default="tiny",
        help="configuration preset of the recipe: tiny (CPU) or paper; MACL also tiny3d and paper3d",
    )
    train.add_argument("--config", type=Path, help="YAML file whose keys override the preset")
    train.add_argument("--data", type=Path, nargs="+", required=True, metavar="MANIFEST", help="dataset manifests")
    train.add_argument(
        "--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (checkpoint, logs, repos)"
    )
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    train.add_argument("--stop-after", type=int, metavar="STEPS", help="checkpoint and stop after this many steps")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)
    register_finetune(subparsers)
    register_demo(subparsers)
    register_evaluate(subparsers)


def cmd_train(args: argparse.Namespace) -> int:
    from .launch import train

    result = train(
        args.recipe,
        args.data,
        args.out,
        preset=args.preset,
        config_file=args.config,
        resume=args.resume,
        stop_after=args.stop_after,
        progress=False if args.no_progress else None,
    )
    if not result.completed:
        print(f"stopped after step {result.global_step}; continue with --resume (checkpoint in {args.out})")
        return 0
    for path in result.exported:
        print(f"exported {path}")
    return 0


def register_finetune(subparsers: argparse._SubParsersAction) -> None:
    finetune = subparsers.add_parser(
        "finetune", help="fine-tune a repo for classification or segmentation (or a linear probe)"
    )
    finetune.add_argument("model", help="repo folder or ORG/NAME")
    finetune.add_argument("--task", choices=["classification", "segmentation"], required=True)
    finetune.add_argument(
        "--data", type=Path, required=True, metavar="MANIFEST", help="manifest with train and val rows"
    )
    finetune.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="run folder: DIR/repo and DIR/metrics.jsonl"
    )
    finetune.add_argument("--freeze", action="store_true", help="frozen encoder: train the head only (linear probe)")
    finetune.add_argument("--preset", default="tiny", help="tiny (CPU, seconds) or paper (the benchmarking study)")
    finetune.add_argument("--config", type=Path, help="YAML file whose keys override the preset")
    finetune.add_argument("--label", help="classification: the manifest labels key (default: the only one)")
    finetune.add_argument("--classes", nargs="+", metavar="NAME", help="class names, index = label or mask value")
    finetune.add_argument(
        "--mask-map",
        nargs="+",
        default=[],
        metavar="VALUE=CLASS",
        help="segmentation: map mask values to class indices, e.g. 1=0 2=1 3=1",
    )
    finetune.add_argument("--repo-id", help="ORG/NAME shown in the card's loading examples")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bar")
    finetune.set_defaults(handler=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from hub.export import resolve_repo
    from hub.processing.processor import MedicalImageProcessor

    from .finetune import default_task, finetune, parse_mask_map

    modality = MedicalImageProcessor.from_pretrained(resolve_repo(args.model)).modality
    task = default_task(args.task, args.data, modality, args.label, args.classes, parse_mask_map(args.mask_map))
    result = finetune(
        args.model,
        task,
        args.data,
        args.out,
        preset=args.preset,
        config_file=args.config,
        freeze=args.freeze,
        repo_id=args.repo_id,
        progress=False if args.no_progress else None,
    )
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"best epoch {result.best_epoch} of {result.epochs_run}: {shown}")
    print(f"exported {result.repo_dir}")
    return 0


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="build the small demo models from synthetic phantoms into the HF cache")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path.home() / ".cache" / "medhub" / "demo",
        help="work folder: phantoms, runs, repos and models.txt (default ~/.cache/medhub/demo)",
    )
    demo.add_argument("--org", default="demo", help="organisation of the published repo ids (default demo)")
    demo.add_argument("--force", action="store_true", help="rebuild even when models.txt lists loadable repos")
    demo.add_argument("--only", choices=["muscle"], help="build and publish the MUSCLE encoder alone")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    for repo_id in run_demo(args.out, org=args.org, force=args.force, progress=not args.no_progress, only=args.only):
        print(repo_id)
    return 0


def register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("evaluate", help="run a transfer study: repeated runs, t-tests, report, figures")
    evaluate.add_argument("study", nargs="?", type=Path, help="study YAML (see --example)")
    evaluate.add_argument("--out", type=Path, metavar="DIR", help="results.jsonl, report.md, summary.csv, figures")
    evaluate.add_argument("--example", action="store_true", help="print a commented study that runs on the phantoms")
    evaluate.add_argument("--jobs", type=int, default=1, help="units run in parallel local processes")
    evaluate.add_argument("--engine", choices=["local", "ray"], default="local", help="local processes or Ray tasks")
    evaluate.add_argument("--resume", action="store_true", help="skip the units already in DIR/results.jsonl")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument(
        "--update-cards",
        action="store_true",
        help="write each backbone's results into its card and publish it as a new revision",
    )
    evaluate.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .errors import TrainingConfigError
    from .evaluate.report import write_all
    from .evaluate.runner import run_study
    from .evaluate.stats import summarise
    from .evaluate.study import EXAMPLE, load_study

    if args.example:
        print(EXAMPLE, end="")
        return 0
    if args.study is None or args.out is None:
        raise TrainingConfigError("medhub evaluate needs a STUDY.yaml and --out DIR (or --example)")
    study = load_study(args.study)
    rows = run_study(
        study, args.out, jobs=args.jobs, engine=args.engine, resume=args.resume, progress=not args.no_progress
    )
    summaries = summarise(rows, study.baseline)
    for path in write_all(summaries, rows, study.baseline, args.out):
        print(f"wrote {path}")
    if args.update_cards:
        from .evaluate.cards import update_cards

        for update in update_cards(study, summaries, args.out):
            where = f"new cache revision {update.commit}" if update.commit else "a new folder"
            print(f"card of {update.backbone} updated: {where} at {update.location}")
    return 0
