"""Run a recipe end to end: process group, configuration, seeding, engine, export."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from . import checkpoint, distributed
from .config import load_recipe_config
from .engine import Engine, RunResult
from .errors import TrainingConfigError
from .recipes import get_recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    recipe: str,
    data: list[Path],
    out: Path,
    preset: str = "tiny",
    config_file: Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Train `recipe` on the `data` manifests into run folder `out` (single process, or one rank under torchrun)."""
    entry = get_recipe(recipe)
    settings = load_recipe_config(entry.settings_class, recipe, preset, config_file)
    if progress is not None:
        settings.engine.progress = progress
    out = Path(out)
    if not resume and (out / checkpoint.CHECKPOINT_NAME).exists():
        raise TrainingConfigError(f"run folder {out} already holds a checkpoint; pass --resume or choose another --out")
    dist_info = distributed.init_distributed()
    try:
        seed_everything(settings.seed)
        built = entry.build(settings, list(data), dist_info)
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(
                yaml.safe_dump({"recipe": recipe, "preset": preset, **asdict(settings)}, sort_keys=False)
            )
        return Engine(out, settings.engine, dist_info).run(built, resume=resume, stop_after=stop_after)
    finally:
        distributed.shutdown()
