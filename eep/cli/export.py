"""`eep export`: write a candidate applied to a model as a Hugging Face checkpoint."""

from __future__ import annotations

import argparse

from eep.candidate import Candidate
from eep.export import export_from_recipe, export_model
from eep.model_card import format_keep

NAME = "export"
HELP = "apply a candidate to a model and save a Hugging Face checkpoint with keep experts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep export`."""
    parser.add_argument("--model", help="builtin:NAME, a local folder or a hub id")
    parser.add_argument("--candidate", help="candidate .safetensors file")
    parser.add_argument(
        "--recipe",
        help="an export's eep_recipe.yaml: rebuild that checkpoint (instead of --model/--candidate)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--trust-remote-code", action="store_true", help="only for models you trust")


def run(args: argparse.Namespace) -> int:
    """Export and print how to load the result."""
    if args.recipe:
        if args.model or args.candidate:
            raise ValueError("--recipe names the model and the candidate: drop --model/--candidate")
        report = export_from_recipe(args.recipe, args.out)
    else:
        if not (args.model and args.candidate):
            raise ValueError("give --model and --candidate, or --recipe")
        report = export_model(
            args.model,
            Candidate.load(args.candidate),
            args.out,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            trust_remote_code=args.trust_remote_code,
        )
    kind = "stock checkpoint" if report.stock else "checkpoint with eep's model class (eep_<family>)"
    print(f"wrote {kind} to {report.out_dir} (model card README.md, recipe eep_recipe.yaml)")
    print(f"  experts per layer: {format_keep(report.keep, report.num_experts)}, top-k {report.top_k}, "
          f"{report.parameters / 1e6:.1f} M parameters")
    print("load it with:")
    for line in report.how_to_load().splitlines():
        print(f"  {line}")
    return 0
