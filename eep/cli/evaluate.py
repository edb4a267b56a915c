"""`eep evaluate`: score a model (optionally with a candidate applied) on one task split.

With `--harness TASK[,TASK...]` the scoring is lm-evaluation-harness' instead (`eep.harness`).
"""

from __future__ import annotations

import argparse
import json

from eep.candidate import Candidate
from eep.fitness import DEFAULT_BATCH_SIZE, Evaluator
from eep.forced import FITNESS_KINDS
from eep.models.loading import parse_device
from eep.models.skipping import installed_skipping

HARNESS_BATCH_SIZE = 8  # lm-eval requests per forward (its HF wrapper's unit)
NAME = "evaluate"
HELP = "score a model, or a candidate applied to it, on a task split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep evaluate`."""
    parser.add_argument("--model", required=True, help="builtin:NAME, a local folder or a hub id")
    parser.add_argument(
        "--candidate", help="candidate .safetensors file (default: the unpruned model)"
    )
    parser.add_argument("--task", help="a task name (`eep tasks`) or a task .yaml file")
    parser.add_argument(
        "--harness",
        metavar="TASK[,TASK...]",
        help="score with lm-evaluation-harness tasks instead of --task (extra `harness`)",
    )
    parser.add_argument(
        "--include-path", help="with --harness: a folder of extra lm-eval task YAMLs"
    )
    parser.add_argument("--num-fewshot", type=int, help="with --harness: lm-eval's few-shot count")
    parser.add_argument("--split", default="search", choices=("search", "dev", "test"))
    parser.add_argument(
        "--fitness", default="accuracy", choices=FITNESS_KINDS,
        help="accuracy (the task's metric), likelihood or kl (teacher-forced: `fitness:` in a campaign)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16"
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"rows per forward (default {DEFAULT_BATCH_SIZE}; "
        f"--harness: {HARNESS_BATCH_SIZE})"
    )
    parser.add_argument(
        "--limit", type=int, help="score only the split's (--harness: each task's) first N examples"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Build the evaluator, score once, print the result."""
    parse_device(args.device)
    if (args.task is None) == (args.harness is None):
        raise ValueError("give --task (eep's scoring) or --harness (lm-evaluation-harness), one")
    if args.harness is None and (args.include_path or args.num_fewshot is not None):
        raise ValueError("--include-path and --num-fewshot go with --harness")
    if args.harness is not None and args.fitness != "accuracy":
        raise ValueError("--fitness goes with --task (lm-evaluation-harness scores its own way)")
    candidate = Candidate.load(args.candidate) if args.candidate else None
    if args.harness is not None:
        return _run_harness(args, candidate)
    evaluator = Evaluator(
        args.model,
        args.task,
        split=args.split,
        device=args.device,
        dtype=args.dtype,
        batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        max_examples=args.limit,
        fitness=args.fitness,
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


def _run_harness(args: argparse.Namespace, candidate: Candidate | None) -> int:
    """lm-eval on the model with the candidate applied in memory; its table or its JSON."""
    from eep.harness import parse_tasks, results_json, results_table, run_harness  # noqa: PLC0415

    results = run_harness(
        args.model,
        parse_tasks(args.harness),
        candidate=candidate,
        limit=args.limit,
        batch_size=HARNESS_BATCH_SIZE if args.batch_size is None else args.batch_size,
        device=args.device,
        dtype=args.dtype,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
    )
    if args.json:
        print(results_json(results, model=args.model, candidate=args.candidate))
    else:
        print(results_table(results))
    return 0
