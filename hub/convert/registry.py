"""A converter: the function that writes a repo from an upstream file, and the CLI flags it adds."""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Converter:
    """`run(args)` converts `args.checkpoint` into `args.out`; every converter also gets the common flags
    (`--out`, `--repo-id`, `--license`, `--base-model`, `--overwrite`); `add_arguments` adds its own."""

    name: str
    help: str
    default_license: str
    run: Callable[[argparse.Namespace], Path]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
