"""`eep inspect MODEL`: structure, parameter counts, pruned sizes and Evaluator memory of a model.

With `--routing TASK ...` it loads the model and prints per-task routing histograms instead.
"""

from __future__ import annotations

import argparse
import json

NAME = "inspect"
HELP = "show an MoE model's experts, sizes and GPU memory needs (config only), or its routing per task"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep inspect`."""
    from eep.inspect import DEFAULT_ACTIVATION_GIB

    parser.add_argument("model", help="builtin:NAME, a model folder or a hub id (only its config is read)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--activation-gib", type=float, default=DEFAULT_ACTIVATION_GIB,
        help=f"GPU memory allowed for activations, KV cache and CUDA context (default {DEFAULT_ACTIVATION_GIB})",
    )
    parser.add_argument(
        "--routing", nargs="+", metavar="TASK",
        help="load the model and print each task's routing histogram (built-in name or task YAML)",
    )
    parser.add_argument("--split", default="test", help="task split for --routing (default test)")
    parser.add_argument("--samples", type=int, help="examples per task for --routing (default all)")
    parser.add_argument("--device", default="cpu", help="device for --routing")
    parser.add_argument("--dtype", default="auto", help="dtype for --routing: auto, float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="only for models you trust")


def run(args: argparse.Namespace) -> int:
    """Describe the model (or its routing) and print the report."""
    if args.routing:
        from eep.routing_stats import routing_histograms

        hists = routing_histograms(
            args.model, args.routing, split=args.split, samples=args.samples, device=args.device,
            dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        )
        print(json.dumps(hists.to_dict()) if args.json else hists.format())
        return 0
    from eep.inspect import describe_model
    from eep.models.loading import load_config

    report = describe_model(load_config(args.model), model=args.model, activation_gib=args.activation_gib)
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0
