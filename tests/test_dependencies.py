"""Every third-party package that hub/, training/ and serving/ import is a declared dependency (or, for an
optional feature, in one of its extras other than ``dev``), and every declared dependency is imported: a plain
``pip install .`` must run every command."""

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"hub", "training", "serving"}


@cache
def _imported_packages() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for package in FIRST_PARTY:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in FIRST_PARTY and top not in sys.stdlib_module_names and top != "_compat_pickle":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> set[str]:
    return _names(_project()["dependencies"])


def _feature_extras() -> set[str]:
    extras = _project().get("optional-dependencies", {})
    return _names([spec for name, specs in extras.items() if name != "dev" for spec in specs])


_DISTRIBUTIONS = cache(packages_distributions)


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _DISTRIBUTIONS().get(module, [])}


def test_every_import_is_a_declared_dependency():
    declared = _declared() | _feature_extras()
    undeclared = {
        module: sorted(files) for module, files in _imported_packages().items() if not _distributions(module) & declared
    }
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def test_every_dependency_is_imported():
    provided = set().union(*(_distributions(module) for module in _imported_packages()))
    unused = _declared() - provided
    assert not unused, f"declared in pyproject but never imported by hub/training/serving: {sorted(unused)}"


def test_scanner_sees_lazy_and_nested_imports():
    imported = _imported_packages()
    assert "training/finetune.py" in imported["sklearn"]
    assert "torch" in imported and "PIL" in imported
