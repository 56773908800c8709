"""The `voxq` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

# Modules that define `register(subparsers)`; each adds its subcommands with `set_defaults(handler=...)`.
SUBCOMMAND_MODULES = (
    "voxq.cli.dev",
    "voxq.cli.demo",
    "voxq.cli.client_commands",
    "voxq.cli.ops",
    "voxq.cli.billing",
    "voxq.cli.providers",
    "voxq.cli.tenancy",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="voxq", description="voxq: batch transcription queue")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `voxq` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
