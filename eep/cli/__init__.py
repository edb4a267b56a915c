"""The `eep` command: one subcommand per module in this package, each a thin layer over a library call.

A subcommand module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order = order in `eep --help`.
COMMANDS = (
    "search",
    "demo",
    "evaluate",
    "prune",
    "polish",
    "export",
    "import_reference",
    "inspect",
    "tasks",
    "validate",
    "dashboard",
    "report",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="eep", description="Prune and merge the experts of MoE language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"eep.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"eep.cli.{name}":
                continue  # not built yet
            raise
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eep` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as exc:
        # Our errors say what is wrong and where; a traceback adds nothing for a user.
        if args.verbose:
            raise
        print(f"eep {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


def _message(exc: BaseException) -> str:
    """The error for a user: an OSError names its file (str(exc) of a bare errno does not)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
