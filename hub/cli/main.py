"""`medhub` entry point: the hub's commands plus those that `training` and `serving` contribute.

Other packages add subcommands through the `medhub.commands` entry-point group; each entry point is a function
taking argparse's subparsers object. `hub` never imports them.
"""

import argparse
import sys
from importlib.metadata import entry_points

import transformers

from hub.errors import MedhubError

ENTRY_POINT_GROUP = "medhub.commands"


def build_parser() -> argparse.ArgumentParser:
    from hub import __version__

    from . import commands

    parser = argparse.ArgumentParser(
        prog="medhub", description="Pretrained medical imaging backbones: build, publish, verify, serve."
    )
    parser.add_argument("--version", action="version", version=f"medhub {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(subparsers)
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        entry_point.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' load reports and per-call progress bars are noise on the command line
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except MedhubError as error:
        print(f"medhub {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"medhub {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
