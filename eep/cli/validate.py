"""`eep validate`: check a campaign YAML without running it."""

from __future__ import annotations

import argparse

from eep.config import load_config

NAME = "validate"
HELP = "check a campaign YAML (and --set overrides) without running it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep validate`."""
    parser.add_argument("config", help="campaign YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE")
    parser.add_argument("--print", action="store_true", help="print the resolved config")


def run(args: argparse.Namespace) -> int:
    """Validate and say so."""
    config = load_config(args.config, args.overrides)
    if args.print:
        print(config.to_yaml(), end="")
    print(f"{args.config}: ok ({config.strategy.kind}, keep {config.keep}, task {config.task.name})")
    return 0
