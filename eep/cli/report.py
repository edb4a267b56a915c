"""`eep report`: write a self-contained report.html and fitness.png for a run directory."""

from __future__ import annotations

import argparse

from eep.report import write_report

NAME = "report"
HELP = "write report.html (self-contained) and fitness.png for a run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep report`."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a campaign's run directory")
    parser.add_argument("--out", metavar="DIR", help="write the two files here instead of RUN_DIR")


def run(args: argparse.Namespace) -> int:
    """Write the report and say where it is."""
    files = write_report(args.run_dir, args.out)
    print(f"wrote {files.html}")
    print(f"wrote {files.figure}")
    return 0
