"""`eep prune`: one-shot expert pruning (NAEE, frequency, soft activation, REAP, random) to a candidate file."""

from __future__ import annotations

import argparse
from pathlib import Path

from eep.models.loading import parse_device
from eep.oneshot import METHODS, oneshot_prune, parse_calibration, task_calibration
from eep.oneshot.naee import DEFAULT_MAX_SUBSETS, ORDERS
from eep.search.budget import BudgetError, KeepBudget

NAME = "prune"
HELP = "one-shot pruning (NAEE, frequency, soft activation, REAP, random) written as a candidate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep prune`."""
    parser.add_argument("--model", required=True, help="builtin:NAME, a local folder or a hub id")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--keep", required=True, type=int, help="experts kept per MoE layer (the mean with bounds)")
    parser.add_argument("--keep-min", type=int, help="global budget: fewest experts a layer keeps")
    parser.add_argument("--keep-max", type=int, help="global budget: most experts a layer keeps")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--task", help="task-specific calibration: the task's search split")
    data.add_argument(
        "--calibration",
        help="task-agnostic calibration: builtin (synthetic mix), FILE.jsonl, FILE.yaml or hf:PATH[:NAME]",
    )
    parser.add_argument("--out", required=True, help="candidate .safetensors file to write")
    parser.add_argument("--split", default="search", help="task split for --task (default search)")
    parser.add_argument("--samples", type=int, help="calibration texts / examples to use")
    parser.add_argument("--max-length", type=int, help="tokens per calibration row or block")
    parser.add_argument("--batch-size", type=int, help="calibration rows per forward (one loss batch)")
    parser.add_argument("--order", choices=ORDERS, default="layerwise", help="NAEE layer order")
    parser.add_argument("--beam-width", type=int, default=1, help="NAEE beam when C(E, keep) is too large")
    parser.add_argument(
        "--max-subsets", type=int, default=DEFAULT_MAX_SUBSETS,
        help="NAEE enumerates when C(E, keep) is at most this, else beam search",
    )
    parser.add_argument("--seed", type=int, default=0, help="random method's seed")
    parser.add_argument("--top-k", type=int, help="active experts per token of the candidate")
    parser.add_argument("--skip", action="store_true", help="also calibrate NAEE dynamic-skipping thresholds")
    parser.add_argument("--skip-quantile", type=float, default=0.5, help="threshold quantile (0.5: the authors' median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="only for models you trust")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    """Prune, save the candidate and print what was kept."""
    # Everything that can be refused is refused before the pass over the calibration data.
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give the candidate's .safetensors file name")
    parse_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = dict(samples=args.samples, max_length=args.max_length, batch_size=args.batch_size)
    if args.task:
        spec = task_calibration(args.task, args.split, **options)
    elif args.calibration:
        spec = parse_calibration(args.calibration, **options)
    elif args.method == "random" and not args.skip:
        spec = None
    else:
        raise ValueError(f"--method {args.method} needs --task T or --calibration SPEC")
    keep = _keep(args)
    result = oneshot_prune(
        args.model,
        args.method,
        keep,
        spec,
        order=args.order,
        beam_width=args.beam_width,
        max_subsets=args.max_subsets,
        seed=args.seed,
        top_k=args.top_k,
        skip=args.skip,
        skip_quantile=args.skip_quantile,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    path = result.candidate.save(args.out)
    if isinstance(keep, int):
        print(f"{args.method}: kept {args.keep} of {result.candidate.num_experts} experts per MoE layer")
    else:
        counts = result.candidate.keep_per_layer
        print(f"{args.method}: kept {sum(counts)} experts over {len(counts)} MoE layers "
              f"({keep.low}..{keep.high} of {result.candidate.num_experts} each): {counts}")
    for layer, kept in enumerate(result.candidate.kept_experts()):
        print(f"  layer {layer}: {kept}")
    if result.calibration_tokens:
        print(f"calibration: {result.candidate.extra.get('calibration', '')}, {result.calibration_tokens} tokens")
    if result.naee is not None:
        n = result.naee
        print(f"NAEE {n.order}: {', '.join(sorted(set(n.methods)))}, passes over the data: {n.passes}, "
              f"{sum(n.layer_seconds) / len(n.layer_seconds):.3f} s per layer scoring")
    if result.skip_thresholds is not None:
        print("skip thresholds: " + ", ".join(f"{t:.3f}" for t in result.skip_thresholds))
    print(f"wrote {path} ({result.seconds:.1f} s)")
    return 0


def _keep(args: argparse.Namespace) -> int | KeepBudget:
    """--keep alone, or a global budget of keep x layers experts within --keep-min..--keep-max."""
    if args.keep_min is None and args.keep_max is None:
        return args.keep
    from eep.models.families import model_shape
    from eep.models.loading import load_config

    shape = model_shape(load_config(args.model, args.trust_remote_code))
    low = args.keep_min if args.keep_min is not None else 1
    high = args.keep_max if args.keep_max is not None else shape.num_experts
    try:
        return KeepBudget(args.keep * shape.num_moe_layers, low, high, shape.num_moe_layers, shape.num_experts)
    except BudgetError as exc:
        raise ValueError(f"--keep {args.keep} --keep-min {low} --keep-max {high}: {exc}") from None
