"""Check (or, with --fix, rewrite) the code that one modeling file copies from another.

Each modeling file must run alone as remote code from an exported repo, so some code stands in several families.
A copy is marked on the line above its `def` or `class` (above its decorators, if any):

    # Copied from hub.models.muscle.modeling_muscle.classification_loss with MuscleConfig->MedCossConfig

The referenced object's source, with each `A->B` replacement applied in order (plain text replacement), must
equal the copy. `Name` may be `Class.method`; the copy may stand at another indentation than the original.
Exits 1 and prints one line per drifted copy (and a diff) when a copy differs; `--fix` writes the original over
each drifted copy instead.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<target>hub\.models\.[\w.]+?)(?: with (?P<replace>.+?))?\s*$")
DEFAULT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Copy:
    path: Path
    marker_line: int  # 0-based index of the marker line
    start: int  # 0-based index of the copy's first line (after the marker)
    end: int  # 0-based index one past the copy's last line
    target: str
    replacements: list[tuple[str, str]]


class CopyError(ValueError):
    """A marker that names no object, or does not stand above a function or class."""


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """Top-level functions and classes, and methods as `Class.method`, by name."""
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        found[f"{node.name}.{child.name}"] = child
    return found


def _span(node: ast.AST) -> tuple[int, int]:
    """0-based (first line, one past the last line) of a definition, decorators included."""
    decorators = getattr(node, "decorator_list", [])
    first = min([node.lineno] + [decorator.lineno for decorator in decorators])
    return first - 1, node.end_lineno


def _parse_replacements(text: str | None, where: str) -> list[tuple[str, str]]:
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        old, sep, new = item.strip().partition("->")
        if not sep or not old:
            raise CopyError(f"{where}: replacement {item.strip()!r} must read OLD->NEW")
        pairs.append((old, new))
    return pairs


def find_copies(path: Path) -> list[Copy]:
    """The marked copies in one file."""
    lines = path.read_text().splitlines(keepends=True)
    starts = {}
    for node in ast.walk(ast.parse("".join(lines), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first, end = _span(node)
            starts[first] = end
    copies = []
    for index, line in enumerate(lines):
        match = MARKER.match(line.rstrip("\n"))
        if not match:
            continue
        where = f"{path}:{index + 1}"
        if index + 1 not in starts:
            raise CopyError(f"{where}: a '# Copied from' marker must stand right above a def or class")
        copies.append(
            Copy(
                path, index, index + 1, starts[index + 1], match["target"], _parse_replacements(match["replace"], where)
            )
        )
    return copies


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _reindent(lines: list[str], indent: str) -> list[str]:
    current = _indent_of(lines[0])
    out = []
    for line in lines:
        if not line.strip():
            out.append("\n")
        elif line.startswith(current):
            out.append(indent + line[len(current) :])
        else:
            out.append(line)
    return out


def expected_source(copy: Copy, root: Path) -> list[str]:
    """The lines the copy must have: the original's source, replacements applied, at the copy's indentation."""
    parts = copy.target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_file = root.joinpath(*parts[:split]).with_suffix(".py")
        if module_file.is_file():
            name = ".".join(parts[split:])
            break
    else:
        raise CopyError(f"{copy.path}:{copy.marker_line + 1}: no module file for {copy.target}")
    source = module_file.read_text()
    definitions = _definitions(ast.parse(source, str(module_file)))
    if name not in definitions:
        raise CopyError(f"{copy.path}:{copy.marker_line + 1}: {module_file} defines no {name}")
    first, end = _span(definitions[name])
    text = "".join(source.splitlines(keepends=True)[first:end])
    for old, new in copy.replacements:
        text = text.replace(old, new)
    copied_indent = _indent_of(copy.path.read_text().splitlines()[copy.start])
    return _reindent(text.splitlines(keepends=True), copied_indent)


def model_files(root: Path) -> list[Path]:
    return sorted(path for path in (root / "hub" / "models").rglob("*.py") if "__pycache__" not in path.parts)


def check(root: Path, fix: bool = False) -> list[str]:
    """Messages for the copies that differ (fixed in place when `fix`)."""
    problems = []
    for path in model_files(root):
        copies = find_copies(path)
        # Rewrite from the bottom so that earlier line numbers stay valid.
        for copy in reversed(copies):
            lines = path.read_text().splitlines(keepends=True)
            expected = expected_source(copy, root)
            actual = lines[copy.start : copy.end]
            if [line.rstrip() for line in actual] == [line.rstrip() for line in expected]:
                continue
            relative = path.relative_to(root)
            if fix:
                lines[copy.start : copy.end] = expected
                path.write_text("".join(lines))
                problems.append(f"{relative}:{copy.start + 1}: rewritten from {copy.target}")
            else:
                diff = difflib.unified_diff(expected, actual, copy.target, f"{relative}:{copy.start + 1}", n=1)
                problems.append(
                    f"{relative}:{copy.start + 1}: differs from {copy.target} (make fix-copies rewrites it)\n"
                    + "".join(diff)
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fix", action="store_true", help="rewrite the copies that differ from their original")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the repository root (default: this one)")
    args = parser.parse_args(argv)
    try:
        problems = check(args.root.resolve(), fix=args.fix)
    except CopyError as error:
        print(error, file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stdout if args.fix else sys.stderr)
    return 0 if args.fix or not problems else 1


if __name__ == "__main__":
    sys.exit(main())
