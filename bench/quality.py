"""Quality of the search strategies on the built-in suite: one campaign per task, keep and strategy.

    python bench/quality.py --keeps 4 2 --budget 401 --jobs 2 --out runs/quality --curves

Every campaign runs in-process on `builtin:tiny-moe` with the same budget and seed; the table
reports test-split scores of the full model, random pruning (mean of the baselines), random
search, coordinate descent, EEP prune-only and EEP prune+merge, and the number of search
evaluations. `--search-metric dense` makes every search (and the dev re-ranking) maximise the
dense metric of its task kind (char_similarity, label_prob) while the table stays exact match /
accuracy on test. `--curves` also prints best-so-far vs evaluations for EEP and random search.
`--strategies ... eep_seeded` adds EEP whose initial population also holds the one-shot prunings
(NAEE, soft activation, REAP, frequency on the search split). A finished campaign's summary is
reused, so a later call with more strategies only runs the new cells.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

STRATEGIES = ("eep", "random", "coordinate_descent")
# EEP whose initial population also holds the one-shot prunings (computed on the search split).
SEEDED = "eep_seeded"
SEEDS = ["naee", "soft_activation", "reap", "frequency"]


# `--search-metric dense`: what searches and dev re-ranking maximise, per task kind.
DENSE = {"generate": "char_similarity", "multiple_choice": "label_prob"}


def campaign_dict(
    task: str, keep: int, strategy: str, budget: int, sizes: tuple[int, int, int], seed: int,
    dense: bool = False, model: str = "builtin:tiny-moe",
) -> dict:
    """The campaign config of one cell of the table."""
    if strategy in ("eep", SEEDED):
        # The authors' schedule scaled to the budget: 31 inits, pruning phase to a quarter
        # (their 100 of 400), merging to the end (their total_iter 400 runs 401 evaluations).
        settings = {"kind": "eep", "total_iter": budget - 1, "discrete_iter": max(31, budget // 4)}
    elif strategy == "random":
        settings = {"kind": "random", "budget": budget}
    else:
        settings = {"kind": "coordinate_descent", "budget": budget}
    search, dev, test = sizes
    from eep.tasks.synthetic import max_new_tokens, task_kind

    task_spec = {
        "name": task,
        "source": {"kind": "builtin", "name": task},
        "scorer": task_kind(task),
        "splits": {"search": search, "dev": dev, "test": test, "seed": 0},
    }
    if task_kind(task) == "generate":
        task_spec["max_new_tokens"] = max_new_tokens(task)
    if dense:
        task_spec["search_metric"] = DENSE[task_kind(task)]
    return {
        **({"init_from": SEEDS} if strategy == SEEDED else {}),
        "name": f"{task}-k{keep}-{strategy}",
        "model": model,
        "task": task_spec,
        "keep": keep,
        "strategy": settings,
        "final": {"random_baselines": 5, "dev_top": 10},
        "evaluation": {"device": "cpu", "threads": 1},
        "output": {"export": False},
        "seed": seed,
    }


def run_one(args: tuple[dict, str]) -> dict:
    """Run one campaign; return its summary."""
    data, run_dir = args
    import torch

    torch.set_num_threads(1)
    from eep.campaign import run_campaign
    from eep.config import config_from_dict

    summary_path = Path(run_dir) / "summary.json"
    if summary_path.is_file():  # finished earlier: the bench resumes where it stopped
        return json.loads(summary_path.read_text())
    resume = (Path(run_dir) / "config.yaml").is_file()
    return run_campaign(config_from_dict(data), run_dir=run_dir, resume=resume, quiet=True).summary


def best_so_far(run_dir: Path, points: list[int]) -> list[float]:
    """Best search score after each of `points` evaluations."""
    scores = [
        r["score"]
        for r in map(json.loads, (run_dir / "evaluations.jsonl").read_text().splitlines())
        if r["split"] == "search"
    ]
    out, best = [], float("-inf")
    for i, s in enumerate(scores, 1):
        best = max(best, s)
        if i in points:
            out.append(best)
    return out


def main() -> None:
    """Run the grid and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--keeps", nargs="*", type=int, default=[4, 2])
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=[*STRATEGIES, SEEDED])
    parser.add_argument("--budget", type=int, default=401, help="evaluations per search (authors: 401)")
    parser.add_argument("--sizes", nargs=3, type=int, default=[128, 128, 500], metavar=("SEARCH", "DEV", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--curves", action="store_true")
    parser.add_argument("--model", default="builtin:tiny-moe", help="a model trained on the built-in tasks")
    parser.add_argument(
        "--search-metric", choices=("primary", "dense"), default="primary",
        help="dense: searches and dev re-ranking maximise char_similarity / label_prob; test stays exact match / acc",
    )
    args = parser.parse_args()
    from eep.tasks.synthetic import SYNTHETIC_TASKS

    tasks = args.tasks or list(SYNTHETIC_TASKS)
    cells = [(t, k, s) for k in args.keeps for t in tasks for s in args.strategies]
    work = [
        (
            campaign_dict(t, k, s, args.budget, tuple(args.sizes), args.seed, args.search_metric == "dense", args.model),
            f"{args.out}/{t}-k{k}-{s}",
        )
        for t, k, s in cells
    ]
    with ProcessPoolExecutor(args.jobs) as ex:
        summaries = list(ex.map(run_one, work))
    results = {cell: summary for cell, summary in zip(cells, summaries, strict=True)}

    def score(task, keep, strategy, method):
        method_data = results.get((task, keep, strategy), {}).get("methods", {}).get(method, {})
        return method_data.get("test"), method_data.get("evaluations")

    for keep in args.keeps:
        print(f"\n### keep {keep} of 8 (test split, budget {args.budget} evaluations per search)\n")
        columns = [
            ("eep", "full"), ("eep", "random"), ("random", "random_search"),
            ("coordinate_descent", "coordinate_descent"), ("eep", "eep_prune_only"), ("eep", "eep"),
        ]
        header = "| task | full | random pruning | random search | coordinate descent | EEP prune-only | EEP prune+merge |"
        if SEEDED in args.strategies:
            columns.append((SEEDED, "eep"))
            header += " EEP seeded with one-shot prunings |"
        print(header)
        print("|---|" + "---|" * len(columns))
        means = [[] for _ in columns]
        for task in tasks:
            cells_text = []
            for i, (strategy, method) in enumerate(columns):
                value, evals = score(task, keep, strategy, method)
                if value is None:
                    cells_text.append("-")
                    continue
                means[i].append(value)
                suffix = f" ({evals})" if method not in ("full", "random") else ""
                cells_text.append(f"{value:.3f}{suffix}")
            print(f"| {task} | " + " | ".join(cells_text) + " |")
        print("| **mean** | " + " | ".join(f"{sum(m) / len(m):.3f}" if m else "-" for m in means) + " |")

    if args.curves:
        points = [p for p in (10, 25, 50, 100, 150, 200, 300, 400) if p <= args.budget]
        print(f"\n### best search score vs evaluations (mean over tasks), points {points}\n")
        print("| keep | strategy | " + " | ".join(str(p) for p in points) + " |")
        print("|---|---|" + "---|" * len(points))
        for keep in args.keeps:
            for strategy in ("eep", "random"):
                curves = [best_so_far(Path(f"{args.out}/{t}-k{keep}-{strategy}"), points) for t in tasks]
                curves = [c for c in curves if len(c) == len(points)]
                if curves:
                    mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(points))]
                    print(f"| {keep} | {strategy} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")


if __name__ == "__main__":
    main()
