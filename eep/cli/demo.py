"""`eep demo`: the tiny end-to-end campaign on the built-in model, on the CPU, in minutes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from eep.campaign import run_campaign
from eep.config import load_config

NAME = "demo"
HELP = "run the demo campaign (configs/tiny.yaml: EEP on builtin:deep-moe, keep 2) end to end"
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "builtin" / "tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep demo`."""
    parser.add_argument("--run-dir", help="run directory (default: runs/tiny-<time>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the demo campaign and say where everything went."""
    config = load_config(DEMO_CONFIG, args.overrides)
    run_dir = args.run_dir or f"runs/tiny-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"eep demo: {config.strategy.kind} on {config.model}, task {config.task.name}, "
          f"keep {config.keep} of 8 experts; run directory {run_dir}")
    start = time.perf_counter()
    result = run_campaign(config, run_dir=run_dir, quiet=args.quiet)
    print()
    print(result.table)
    print()
    print(f"campaign time:   {time.perf_counter() - start:.0f} s")
    print(f"run directory:   {result.run_dir}")
    if result.export_dir is not None:
        print(f"exported model:  {result.export_dir}  (AutoModelForCausalLM.from_pretrained"
              f"{'' if result.summary.get('export_stock', True) else ' after import eep'})")
    print(f"report:          eep report {result.run_dir}")
    return 0
