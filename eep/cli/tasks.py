"""`eep tasks`: the task names `--task` accepts."""

from __future__ import annotations

import argparse

from eep.tasks.registry import available_tasks

NAME = "tasks"
HELP = "list the available task names (built-in synthetic tasks and shipped specs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`eep tasks` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Print one task name per line."""
    for name in available_tasks():
        print(name)
    return 0
