"""A recipe value has one source: the recipe's YAML `defaults` and its settings dataclasses cannot both hold it."""

import dataclasses
import typing
from dataclasses import dataclass, field

import pytest
import yaml

from training.config import RECIPE_DIR, AugmentSettings, EngineSettings, OptimSettings, load_recipe_config
from training.recipes import RECIPES
from training.slices import ViewSettings

# Components that several stages or recipes use: their defaults fill what a config leaves out, and a YAML that
# sets one of their fields states that stage's value outright.
COMPONENTS = (OptimSettings, AugmentSettings, ViewSettings)


def _has_default(spec: dataclasses.Field) -> bool:
    return spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING


def values_set_twice(settings_class: type, data: dict, where: str = "defaults") -> list[str]:
    """The keys of `data` whose value the dataclasses also hold: a field of a recipe's own settings class with a
    default, or an `EngineSettings` field set to its default (a recipe's YAML names only what it changes there)."""
    hints = typing.get_type_hints(settings_class)
    fields = {spec.name: spec for spec in dataclasses.fields(settings_class)}
    twice = []
    for name, value in data.items():
        spec, path = fields[name], f"{where}.{name}"
        if settings_class is EngineSettings:
            if value == spec.default:
                twice.append(path)
        elif settings_class not in COMPONENTS and _has_default(spec):
            twice.append(path)
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            twice += values_set_twice(hints[name], value, path)
    return twice


def _recipe_file(recipe: str) -> dict:
    return yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_yaml_and_dataclasses_hold_each_value_once(recipe):
    assert values_set_twice(RECIPES[recipe].settings_class, _recipe_file(recipe)["defaults"]) == []


@pytest.mark.parametrize(
    "recipe, preset", [(recipe, preset) for recipe in sorted(RECIPES) for preset in _recipe_file(recipe)["presets"]]
)
def test_every_preset_builds_from_the_yaml_alone(recipe, preset):
    settings = load_recipe_config(RECIPES[recipe].settings_class, recipe, preset)
    assert settings.variant == _recipe_file(recipe)["presets"][preset].get("variant", settings.variant)


@dataclass(kw_only=True)
class _Stage:
    steps: int = 10
    optim: OptimSettings = field(default_factory=OptimSettings)


@dataclass(kw_only=True)
class _Settings:
    seed: int
    engine: EngineSettings = field(default_factory=EngineSettings)
    stage: _Stage


def test_a_value_set_in_both_places_is_found():
    data = {
        "seed": 0,
        "engine": {"sync_bn": False, "log_every": 20},
        "stage": {"steps": 5, "optim": {"lr": 0.1}},
    }
    assert values_set_twice(_Settings, data) == [
        "defaults.engine",
        "defaults.engine.log_every",
        "defaults.stage.steps",
        "defaults.stage.optim",
    ]
