"""`eep tasks`: the tasks `--task` accepts, what each is, and its examples as the model sees them."""

from __future__ import annotations

import argparse

from eep.tasks.catalog import format_examples, format_table, task_table
from eep.tasks.registry import resolve_task
from eep.tasks.vocab import SPLIT_NAMES

NAME = "tasks"
HELP = "list the tasks (kind, source, metrics, split sizes, offline) or --show one's examples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep tasks`."""
    parser.add_argument(
        "--show", metavar="TASK", help="print examples of a task (name or .yaml file)"
    )
    parser.add_argument("--split", default="search", choices=SPLIT_NAMES, help="with --show")
    parser.add_argument("-n", type=int, default=3, help="examples to print with --show")
    parser.add_argument("--names", action="store_true", help="only the names, one a line")


def run(args: argparse.Namespace) -> int:
    """Print the task table, the names, or a task's examples."""
    if args.show:
        if args.n < 1:
            raise ValueError(f"-n must be >= 1, got {args.n}")
        spec = resolve_task(args.show)
        print(format_examples(spec, args.split, args.n))
        return 0
    rows = task_table()
    if args.names:
        print("\n".join(r.name for r in rows))
        return 0
    print(format_table(rows))
    print("\nOFFLINE: yes = built in or local files; cached = in the Hugging Face cache; "
          "no (download) = `datasets` downloads it on first use.")
    print("Examples as the model sees them: eep tasks --show NAME [--split S] [-n 3]")
    return 0
