"""Gradient polishing (eep.polish) on a random pruning: seconds per step, KL and dev score before/after.

    python bench/polish.py --model builtin:deep-moe --task reverse --keep 2 --steps 200 --lrs 0.01
    python bench/polish.py --model builtin:deep-moe --task reverse --keep 2 --steps 100 --lrs 0.003 0.01 0.03 --tunes merge,router merge

One torch thread. The task's splits are resized (`--sizes SEARCH DEV TEST`, as bench/quality.py);
the candidate is `Candidate.random_pruning(..., generator=--candidate-seed)`. Per (tune, lr): steps
run, seconds per step (the Adam steps alone), the mean KL over the search split before and after
(the `kl` fitness, whatever `improved` decides), the training loss of the first and last 10 steps,
and the task metric on dev before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    """Run the grid and print one JSON line per (tune, lr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:deep-moe")
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--sizes", nargs=3, type=int, default=[64, 64, 200], metavar=("SEARCH", "DEV", "TEST"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.01])
    parser.add_argument("--tunes", nargs="+", default=["merge,router"])
    parser.add_argument("--candidate-seed", type=int, default=0)
    parser.add_argument("--no-dev", action="store_true", help="skip the dev scores")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from eep.candidate import Candidate
    from eep.config import PolishSettings
    from eep.fitness import Evaluator
    from eep.polish import polish_on_split
    from eep.tasks.registry import resolve_task
    from eep.tasks.spec import Splits

    search_n, dev_n, test_n = args.sizes
    spec = resolve_task(args.task).model_copy(
        update={"splits": Splits(search=search_n, dev=dev_n, test=test_n, seed=0)}
    )
    search = Evaluator(args.model, spec, "search", device="cpu", fitness="kl")
    dev = None if args.no_dev else Evaluator(search.loaded, spec, "dev")
    candidate = Candidate.random_pruning(
        search.num_layers, search.num_experts, args.keep, generator=args.candidate_seed
    )
    dev_before = None if dev is None else dev.evaluate(candidate).score
    for tune in args.tunes:
        for lr in args.lrs:
            settings = PolishSettings(
                steps=args.steps, lr=lr, batch_size=args.batch_size, tune=tune.split(",")
            )
            out = polish_on_split(search, candidate, settings)
            dev_after = None if dev is None else dev.evaluate(out.polished).score
            print(json.dumps({
                "model": args.model, "task": args.task, "keep": args.keep, "tune": tune, "lr": lr,
                "steps": out.steps, "seconds_per_step": round(out.step_seconds / out.steps, 4),
                "kl_before": round(out.kl_before, 4), "kl_polished": round(out.kl_polished, 4),
                "improved": out.improved,
                "loss_first10": round(statistics.fmean(out.history[:10]), 4),
                "loss_last10": round(statistics.fmean(out.history[-10:]), 4),
                "dev_before": dev_before, "dev_after": dev_after, "seconds": round(out.seconds, 1),
            }), flush=True)


if __name__ == "__main__":
    main()
