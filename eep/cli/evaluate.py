"""`eep evaluate`: score a model (optionally with a candidate applied) on one task split."""

from __future__ import annotations

import argparse
import json

from eep.candidate import Candidate
from eep.fitness import DEFAULT_BATCH_SIZE, Evaluator
from eep.models.loading import parse_device
from eep.models.skipping import installed_skipping

NAME = "evaluate"
HELP = "score a model, or a candidate applied to it, on a task split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep evaluate`."""
    parser.add_argument("--model", required=True, help="builtin:NAME, a local folder or a hub id")
    parser.add_argument(
        "--candidate", help="candidate .safetensors file (default: the unpruned model)"
    )
    parser.add_argument(
        "--task", required=True, help="a task name (`eep tasks`) or a task .yaml file"
    )
    parser.add_argument("--split", default="search", choices=("search", "dev", "test"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16"
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per forward"
    )
    parser.add_argument("--limit", type=int, help="score only the split's first N examples")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Build the evaluator, score once, print the result."""
    parse_device(args.device)
    candidate = Candidate.load(args.candidate) if args.candidate else None
    evaluator = Evaluator(
        args.model,
        args.task,
        split=args.split,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_examples=args.limit,
    )
    result = evaluator.evaluate(candidate)
    # A candidate from `eep prune --skip` is scored with dynamic skipping, installed afresh by this
    # evaluate call: its counters cover exactly these examples.
    skipping = installed_skipping(evaluator.model)
    skipped = skipping.skipped_fraction() if skipping is not None else None
    if args.json:
        out = {
            "model": args.model,
            "task": evaluator.spec.name,
            "candidate": args.candidate,
            **result.to_dict(with_hits=False),
        }
        if skipped is not None:
            out["skipped_fraction"] = skipped
        print(json.dumps(out))
        return 0
    others = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != result.metric)
    print(
        f"{evaluator.spec.name} [{result.split}]: {result.metric} {result.score:.4f}"
        + (f" ({others})" if others else "")
    )
    print(
        f"  {result.count} examples in {result.seconds:.2f} s, "
        f"{result.tokens_per_second:,.0f} tokens/s"
    )
    if skipped is not None:
        print(f"  dynamic skipping: {100 * skipped:.1f}% of expert calls skipped")
    return 0
