"""`medhub train`, `medhub finetune` and `medhub demo`, contributed through the `medhub.commands` entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

from .recipes import RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="pretrain a family with its recipe (single process or torchrun)")
    train.add_argument("recipe", choices=sorted(RECIPES), help="; ".join(f"{e.name}: {e.help}" for e in RECIPES.values()))
    train.add_argument("--preset", default="tiny", help="configuration preset of the recipe: tiny (CPU) or paper")
    train.add_argument("--config", type=Path, help="YAML file whose keys override the preset")
    train.add_argument("--data", type=Path, nargs="+", required=True, metavar="MANIFEST", help="dataset manifests")
    train.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder (checkpoint, logs, repos)")
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    train.add_argument("--stop-after", type=int, metavar="STEPS", help="checkpoint and stop after this many steps")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .launch import train

    result = train(args.recipe, args.data, args.out, preset=args.preset, config_file=args.config, resume=args.resume,
                   stop_after=args.stop_after, progress=False if args.no_progress else None)
    if not result.completed:
        print(f"stopped after step {result.global_step}; continue with --resume (checkpoint in {args.out})")
        return 0
    for path in result.exported:
        print(f"exported {path}")
    return 0
