"""A converter: the function that writes a repo from an upstream file, and the CLI flags it adds."""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMMON_OPTIONS = ("repo_id", "license", "base_model", "overwrite")


@dataclass(frozen=True)
class Converter:
    """`convert(checkpoint, out_dir, **options)` writes a repo. Every converter takes the common options
    (`repo_id`, `license`, `base_model`, `overwrite`; CLI `--repo-id` ...); `add_arguments` adds CLI flags whose
    destinations, listed in `options`, are passed as keyword arguments of the same names."""

    name: str
    help: str
    default_license: str
    convert: Callable[..., Path]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    options: tuple[str, ...] = ()

    def run(self, args: argparse.Namespace) -> Path:
        """Convert with the parsed CLI arguments."""
        options = {name: getattr(args, name) for name in COMMON_OPTIONS + self.options}
        return self.convert(args.checkpoint, args.out, **options)
