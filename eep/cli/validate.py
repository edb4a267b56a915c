"""`eep validate`: check a campaign YAML without running it."""

from __future__ import annotations

import argparse
from pathlib import Path

from eep.config import CampaignConfig, load_config
from eep.search.budget import BudgetError

NAME = "validate"
HELP = "check a campaign YAML (and --set overrides) without running it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep validate`."""
    parser.add_argument("config", help="campaign YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE")
    parser.add_argument("--print", action="store_true", help="print the resolved config")


def check_campaign(config: CampaignConfig) -> None:
    """What `eep search` checks before its first evaluation, short of loading weights."""
    from eep.candidate import Candidate
    from eep.models.families import detect_family, model_shape
    from eep.models.loading import load_config as load_model_config
    from eep.oneshot import METHODS
    from eep.search import build_strategy

    model_config = load_model_config(config.model, config.trust_remote_code)
    shape = model_shape(model_config)
    seeds = []
    for entry in config.init_from:
        if entry in METHODS:
            # A stand-in of the right shape: the one-shot method itself needs the weights.
            budget = config.strategy.keep_budget(shape.num_moe_layers, shape.num_experts)
            seeds.append(Candidate.random_pruning(
                shape.num_moe_layers, shape.num_experts, min(budget.low, shape.num_experts), len(seeds),
                top_k=config.top_k,
            ) if budget.is_uniform else Candidate.from_kept(
                [list(range(k)) for k in budget.even_allocation()], shape.num_experts, top_k=config.top_k,
            ))
        elif not Path(entry).is_file():
            raise ValueError(
                f"init_from entry {entry!r} is neither a candidate file nor a one-shot method "
                f"({', '.join(METHODS)})"
            )
        else:
            seeds.append(Candidate.load(entry))
    build_strategy(
        config.strategy, shape.num_moe_layers, shape.num_experts, seed=config.seed,
        model_id=config.model, init_from=seeds,
    )
    top_k = config.top_k or shape.top_k
    if config.strategy.global_budget:
        budget = config.strategy.keep_budget(shape.num_moe_layers, shape.num_experts)  # fits this model?
        refusal = budget.routing_refusal(detect_family(model_config).routing(model_config))
        if refusal is not None:
            raise ValueError(f"{config.model}: {refusal}")
    elif config.keep < top_k:
        raise ValueError(f"keep={config.keep} is smaller than top_k={top_k}: a token cannot use more "
                         "experts than a layer keeps")


def run(args: argparse.Namespace) -> int:
    """Validate and say so."""
    config = load_config(args.config, args.overrides)
    try:
        check_campaign(config)
    except BudgetError as exc:
        raise ValueError(f"{args.config}: {exc}") from None
    if args.print:
        print(config.to_yaml(), end="")
    kept = f"keep {config.keep}" if not config.strategy.global_budget else "a global expert budget"
    print(f"{args.config}: ok ({config.strategy.kind}, {kept}, task {config.task.name})")
    return 0
