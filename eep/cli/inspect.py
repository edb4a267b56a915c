"""`eep inspect MODEL`: structure, parameter counts, pruned sizes and Evaluator memory of a model."""

from __future__ import annotations

import argparse
import json

NAME = "inspect"
HELP = "show an MoE model's experts, parameter counts, pruned sizes and GPU memory needs (config only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep inspect`."""
    from eep.inspect import DEFAULT_ACTIVATION_GIB

    parser.add_argument("model", help="builtin:NAME, a model folder or a hub id (only its config is read)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--activation-gib", type=float, default=DEFAULT_ACTIVATION_GIB,
        help=f"GPU memory allowed for activations, KV cache and CUDA context (default {DEFAULT_ACTIVATION_GIB})",
    )


def run(args: argparse.Namespace) -> int:
    """Describe the model and print the report."""
    from eep.inspect import describe_model
    from eep.models.loading import load_config

    report = describe_model(load_config(args.model), model=args.model, activation_gib=args.activation_gib)
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0
