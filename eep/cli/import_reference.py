"""`eep import-reference`: convert an EEP authors' coefficient file (.pth) into a candidate."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "import-reference"
HELP = "convert an EEP authors' searched-coefficient file (.pth) into an eep candidate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep import-reference`."""
    parser.add_argument("file", type=Path, help="the authors' coefficient file, e.g. squad_budget_4.pth")
    parser.add_argument("--out", type=Path, required=True, help="candidate to write (.safetensors)")
    parser.add_argument(
        "--num-layers", type=int, default=None,
        help="MoE layers of the target model (default: from --model, else 32 = Mixtral-8x7B)",
    )
    parser.add_argument(
        "--model", default=None,
        help="target model (builtin:NAME, folder or hub id): layer count and E from its config",
    )
    parser.add_argument(
        "--top-k", type=int, default=None,
        help="active experts per token (the authors' --active_num); default: the model's",
    )


def run(args: argparse.Namespace) -> int:
    """Import, write the candidate, print a summary."""
    from eep.reference import import_reference

    candidate, notes = import_reference(
        args.file, num_layers=args.num_layers, model=args.model, top_k=args.top_k
    )
    out = candidate.save(args.out)
    for note in notes:
        print(f"note: {note}")
    extra = candidate.extra
    print(
        f"{args.file.name}: {extra['layout']} layout ({extra['key_order']}), keep={candidate.keep} "
        f"of E={candidate.num_experts}, {candidate.num_layers} layers, "
        f"router_mapping={candidate.router_mapping}"
    )
    print(f"wrote {out} ({candidate.describe()})")
    return 0
