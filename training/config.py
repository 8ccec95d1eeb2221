"""Recipe configurations: YAML files with `defaults` and named `presets`, loaded into typed dataclasses.

A recipe file `training/recipes/<recipe>.yaml` has a `defaults` mapping and a `presets` mapping (`tiny`: CPU,
minutes; `paper`: the reference hyper-parameters). The effective configuration is
`defaults` <- `presets[preset]` <- the user's `--config FILE`, merged key by key (nested mappings merge, lists
and scalars replace). Unknown keys are errors that name the key, so a typo never silently trains with a default.

A value has one source. A recipe's own settings dataclasses have no default for a field its YAML `defaults` set
(the YAML holds the recipe's values); `EngineSettings`' defaults are every recipe's, so a YAML names only what it
changes there; components that several stages use (`OptimSettings`, `AugmentSettings`, the MACL views) keep
defaults for what a config leaves out. `tests/test_training_config.py` checks all three.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainingConfigError

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class OptimSettings:
    """Optimiser and learning-rate schedule of one stage: linear warm-up, then cosine to `min_lr_ratio * lr`."""

    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise TrainingConfigError(f"optimizer {self.optimizer!r} is not one of sgd, adam, adamw")
        if self.batch_size < 1 or self.lr <= 0:
            raise TrainingConfigError(f"batch_size and lr must be positive, got {self.batch_size} and {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainingConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class EngineSettings:
    """How the engine runs a recipe. `amp` (fp16 autocast) takes effect on GPU only; `sync_bn` under torchrun
    with more than one rank, on any backend (BatchNorm statistics over all ranks: `training.sync_batchnorm`), in
    every stage but those that need per-rank statistics (MoCo's shuffled BatchNorm). These defaults are every
    recipe's: a recipe's YAML names only what it changes."""

    amp: bool = True
    grad_clip: float = 0.0
    checkpoint_every: int = 1000
    log_every: int = 20
    num_workers: int = 4
    sync_bn: bool = True
    progress: bool = True


@dataclass
class AugmentSettings:
    """Geometric and noise augmentations (2D and 3D). MUSCLE uses no random crop, blur or colour jitter."""

    flip_prob: float = 0.5
    flip_axes: list[int] = field(default_factory=lambda: [-1])
    rotate_degrees: float = 10.0
    noise_std: float = 0.0


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def build(cls: type, data: Any, where: str = "config") -> Any:
    """Instantiate dataclass `cls` from nested mappings, rejecting unknown or mistyped keys by name."""
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainingConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise TrainingConfigError(f"{where}: {error}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where)
    if _is_dataclass_type(tp):
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TrainingConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TrainingConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is not tp:
        raise TrainingConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in `override` replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise TrainingConfigError(f"cannot read config {str(path)!r}: {error}") from None
    if not isinstance(data, dict):
        raise TrainingConfigError(f"config {str(path)!r} must hold a mapping")
    return data


def recipe_settings(recipe: str, preset: str, config_file: Path | None = None) -> dict[str, Any]:
    """The merged settings mapping of `recipe` at `preset`, with the user's file on top."""
    path = RECIPE_DIR / f"{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise TrainingConfigError(f"recipe {recipe!r} has no configuration file; known recipes: {', '.join(known)}")
    data = _read_yaml(path)
    presets = data.get("presets", {})
    if preset not in presets:
        raise TrainingConfigError(f"recipe {recipe!r} has no preset {preset!r}; choose one of {', '.join(presets)}")
    settings = merge(data.get("defaults", {}), presets[preset] or {})
    if config_file is not None:
        settings = merge(settings, _read_yaml(Path(config_file)))
    return settings


def load_recipe_config(cls: type, recipe: str, preset: str, config_file: Path | None = None) -> Any:
    return build(cls, recipe_settings(recipe, preset, config_file), f"{recipe} config")
