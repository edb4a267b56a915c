"""`eep search`: run or resume a campaign from its YAML file."""

from __future__ import annotations

import argparse
import sys

from eep.campaign import run_campaign
from eep.config import load_config
from eep.dashboard.server import dashboard_hint, start_dashboard
from eep.distributed.pool import PoolError

NAME = "search"
HELP = "run a pruning/merging campaign described by a YAML file (or resume one)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep search`."""
    parser.add_argument("config", help="campaign YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                        help="override a field, e.g. --set strategy.total_iter=50 (repeatable)")
    parser.add_argument("--run-dir", help="run directory (default: output.run_dir or runs/<name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the campaign in RUN_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--dashboard", action="store_true",
                        help="also serve the live dashboard (127.0.0.1:8266) while the campaign runs")


def run(args: argparse.Namespace) -> int:
    """Run the campaign and print its summary."""
    config = load_config(args.config, args.overrides)
    run_dir = args.resume or args.run_dir or config.run_dir
    if args.dashboard:
        try:
            _, url = start_dashboard([run_dir])
            print(f"dashboard: {url}")
        except OSError as exc:
            print(f"dashboard not started ({exc}); {dashboard_hint(run_dir)}")
    else:
        print(dashboard_hint(run_dir))
    try:
        result = run_campaign(config, run_dir=run_dir, resume=bool(args.resume), quiet=args.quiet)
    except PoolError as exc:
        # Every worker is lost; the campaign checkpointed on the way out.
        print(f"eep search: error: {exc}\nthe run directory is intact; continue with: "
              f"eep search {args.config} --resume {run_dir}", file=sys.stderr)
        return 1
    print(result.table)
    print(f"run directory: {result.run_dir}")
    if result.export_dir is not None:
        print(f"exported model: {result.export_dir}")
    return 0
