"""Quality of the search strategies on the built-in suite: one campaign per task, keep, strategy and seed.

    python bench/quality.py --keeps 4 2 --budget 401 --jobs 2 --out runs/quality --curves
    python bench/quality.py --model builtin:deep-moe --tasks add count reverse --keeps 4 2 \
        --strategies random coordinate_descent eep eep_seeded --seeds 0 1 2 --oneshot --curves

Every campaign runs in-process with the same budget; the table reports test-split scores of the
full model, random pruning (mean of the campaign's random baselines), random search, coordinate
descent, EEP prune-only and EEP prune+merge, and the number of search evaluations. With several
`--seeds` every search cell is the mean over seeds with its range (min-max), and the mean row is
the mean over seeds of the per-seed means over tasks, with their range; random pruning is then
the mean of every seed's 5 draws.

`--strategies ... eep_seeded` adds EEP whose initial population also holds the one-shot prunings
(NAEE, soft activation, REAP, frequency), computed once per task and keep on the search split and
shared by every seed. `--oneshot` also scores those one-shot prunings on the same test examples.
`--search-metric dense` makes every search (and the dev re-ranking) maximise the dense metric of
its task kind (char_similarity, label_prob) while the table stays exact match / accuracy on test.
`--curves` prints best-so-far search score vs evaluations per strategy (mean over tasks and seeds).
A finished campaign's summary is reused, so a later call with more strategies or seeds only runs
the new cells.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

STRATEGIES = ("eep", "random", "coordinate_descent")
# EEP whose initial population also holds the one-shot prunings (computed on the search split).
SEEDED = "eep_seeded"
SEEDS = ["naee", "soft_activation", "reap", "frequency"]
# EEP seeded under a global budget (keep x layers experts, each layer keep // 2 .. 2 keep), its
# inits the uniform one-shot prunings plus the same methods under the budget.
BUDGET = "eep_budget"
# Either, with its dev winner polished (eep.polish) and a search shortened by --polish-evals.
POLISHED = {f"{SEEDED}_polish": SEEDED, f"{BUDGET}_polish": BUDGET}
EXTRA = (SEEDED, BUDGET, *POLISHED)

# (strategy, summary method key, column label) of the search columns, in table order.
SEARCH_COLUMNS = [
    ("random", "random_search", "random search"),
    ("coordinate_descent", "coordinate_descent", "coordinate descent"),
    ("eep", "eep_prune_only", "EEP prune-only"),
    ("eep", "eep", "EEP prune+merge"),
    (SEEDED, "eep", "EEP seeded"),
    (BUDGET, "eep", "EEP budget"),
    (f"{SEEDED}_polish", "chosen", "EEP seeded + polish"),
    (f"{BUDGET}_polish", "chosen", "EEP budget + polish"),
    # The polished candidate whether or not it beat the winner on dev (the rule's cost).
    (f"{SEEDED}_polish", "polish", "EEP seeded, polished"),
    (f"{BUDGET}_polish", "polish", "EEP budget, polished"),
]

# `--search-metric dense`: what searches and dev re-ranking maximise, per task kind.
DENSE = {"generate": "char_similarity", "multiple_choice": "label_prob"}


def campaign_dict(
    task: str, keep: int, strategy: str, budget: int, sizes: tuple[int, int, int], seed: int,
    dense: bool = False, model: str = "builtin:tiny-moe", batch_size: int = 32,
    init_from: list[str] | None = None, polish_evals: int = 0, polish: dict | None = None,
) -> dict:
    """The campaign config of one cell of the table."""
    base = POLISHED.get(strategy, strategy)
    # Equal wall time: the polishing's cost comes off the search's merging phase.
    shorter = polish_evals if strategy in POLISHED else 0
    if base in ("eep", SEEDED, BUDGET):
        # The authors' schedule scaled to the budget: 31 inits, pruning phase to a quarter
        # (their 100 of 400), merging to the end (their total_iter 400 runs 401 evaluations).
        settings = {"kind": "eep", "total_iter": budget - 1 - shorter, "discrete_iter": max(31, budget // 4)}
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
    seeded = init_from or SEEDS
    return {
        **({"init_from": seeded} if base in (SEEDED, BUDGET) else {}),
        **(budget_bounds(keep) if base == BUDGET else {}),
        **({"polish": polish or True} if strategy in POLISHED else {}),
        "name": f"{task}-k{keep}-{strategy}",
        "model": model,
        "task": task_spec,
        "keep": keep,
        "strategy": settings,
        "final": {"random_baselines": 5, "dev_top": 10},
        "evaluation": {"device": "cpu", "threads": 1, "batch_size": batch_size},
        "output": {"export": False},
        "seed": seed,
    }


def budget_bounds(keep: int) -> dict:
    """The global budget of the budget cells: keep x layers experts, each layer keep // 2 .. 2 keep."""
    return {"keep_min": max(1, keep // 2), "keep_max": 2 * keep}


def run_dir_of(out: str, task: str, keep: int, strategy: str, seed: int) -> Path:
    """Where one campaign of the grid runs (seed 0 keeps the name of single-seed grids)."""
    suffix = "" if seed == 0 else f"-s{seed}"
    return Path(out) / f"{task}-k{keep}-{strategy}{suffix}"


def oneshot_dir_of(out: str, task: str, keep: int) -> Path:
    """Where the one-shot prunings of one task and keep live (shared by every seed)."""
    return Path(out) / f"oneshot-{task}-k{keep}"


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


def oneshot_one(args: tuple[dict, str, bool]) -> dict[str, float]:
    """Compute the one-shot prunings of one task and keep on the search split; test-score them if asked."""
    data, out_dir, score = args
    import torch

    torch.set_num_threads(1)
    from eep.candidate import Candidate
    from eep.config import config_from_dict
    from eep.fitness import Evaluator
    from eep.oneshot import seed_candidates

    config = config_from_dict(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_candidates(SEEDS, config.model, config.task, config.keep, out)
    if config.strategy.global_budget:  # the same methods under the budget, beside the uniform ones
        from eep.models.families import model_shape
        from eep.models.loading import load_config

        shape = model_shape(load_config(config.model))
        budget = config.strategy.keep_budget(shape.num_moe_layers, shape.num_experts)
        seed_candidates(SEEDS, config.model, config.task, budget, out / "budget")
    scores_path = out / "test.json"
    if not score or scores_path.is_file():
        return json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    evaluator = Evaluator(config.model, config.task, "test", batch_size=config.evaluation.batch_size)
    scores = {m: evaluator.evaluate(Candidate.load(out / f"init_{m}.safetensors")).score for m in SEEDS}
    scores_path.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


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


def spread(values: list[float]) -> str:
    """`mean` for one value, `mean (min-max)` for several."""
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    """Run the grid and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--keeps", nargs="*", type=int, default=[4, 2])
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=[*STRATEGIES, *EXTRA])
    parser.add_argument("--polish-evals", type=int, default=0,
                        help="evaluations the polishing costs: taken off the polished cells' searches")
    parser.add_argument("--polish-steps", type=int, help="polishing steps (default: eep.config.PolishSettings)")
    parser.add_argument("--budget", type=int, default=401, help="evaluations per search (authors: 401)")
    parser.add_argument("--sizes", nargs=3, type=int, default=[128, 128, 500], metavar=("SEARCH", "DEV", "TEST"))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="one campaign per seed")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation rows per forward")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--curves", action="store_true")
    parser.add_argument("--oneshot", action="store_true", help="also test-score the one-shot prunings")
    parser.add_argument("--model", default="builtin:tiny-moe", help="a model trained on the built-in tasks")
    parser.add_argument(
        "--search-metric", choices=("primary", "dense"), default="primary",
        help="dense: searches and dev re-ranking maximise char_similarity / label_prob; test stays exact match / acc",
    )
    args = parser.parse_args()
    from eep.tasks.synthetic import SYNTHETIC_TASKS

    tasks = args.tasks or list(SYNTHETIC_TASKS)
    sizes = tuple(args.sizes)
    dense = args.search_metric == "dense"

    def config(task: str, keep: int, strategy: str, seed: int) -> dict:
        folder = oneshot_dir_of(args.out, task, keep)
        init = [str(folder / f"init_{m}.safetensors") for m in SEEDS]
        if POLISHED.get(strategy, strategy) == BUDGET:
            init += [str(folder / "budget" / f"init_{m}.safetensors") for m in SEEDS]
        polish = {"steps": args.polish_steps} if args.polish_steps else None
        return campaign_dict(
            task, keep, strategy, args.budget, sizes, seed, dense, args.model, args.batch_size, init,
            args.polish_evals, polish,
        )

    oneshot: dict[tuple[str, int], dict[str, float]] = {}
    seeded = [s for s in args.strategies if s in EXTRA]
    if args.oneshot or seeded:
        pairs = [(t, k) for k in args.keeps for t in tasks]
        # The budget cells need the budget seeds too; computing them also computes the uniform ones.
        kind = BUDGET if any(POLISHED.get(s, s) == BUDGET for s in seeded) else SEEDED
        work = [
            (config(t, k, kind, 0), str(oneshot_dir_of(args.out, t, k)), args.oneshot) for t, k in pairs
        ]
        with ProcessPoolExecutor(args.jobs) as ex:
            oneshot = dict(zip(pairs, ex.map(oneshot_one, work), strict=True))

    cells = [(t, k, s, seed) for k in args.keeps for seed in args.seeds for s in args.strategies for t in tasks]
    work = [(config(*cell), str(run_dir_of(args.out, *cell))) for cell in cells]
    with ProcessPoolExecutor(args.jobs) as ex:
        results = dict(zip(cells, ex.map(run_one, work), strict=True))

    def method(task, keep, strategy, seed, key):
        summary = results.get((task, keep, strategy, seed), {})
        if key == "chosen":  # the campaign's result: the polished candidate when it was kept
            key = summary.get("chosen", "")
        return summary.get("methods", {}).get(key, {})

    def reference(task, keep, key):
        """A score every campaign computes (full model, random pruning): the mean over seeds.

        Campaigns of one seed share it (random baselines are drawn from the campaign's seed), so
        random pruning is the mean of 5 draws per seed over every seed.
        """
        values = []
        for seed in args.seeds:
            found = (method(task, keep, s, seed, key).get("test") for s in args.strategies)
            value = next((v for v in found if v is not None), None)
            if value is not None:
                values.append(value)
        return statistics.mean(values) if values else None

    columns = [c for c in SEARCH_COLUMNS if c[0] in args.strategies]
    oneshot_names = SEEDS if args.oneshot else []
    for keep in args.keeps:
        seeds_text = f"{len(args.seeds)} seeds, mean (min-max)" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
        print(f"\n### keep {keep} (test split; budget {args.budget} evaluations per search; {seeds_text})\n")
        labels = ["full", "random pruning", *oneshot_names, *(label for _, _, label in columns)]
        print("| task | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        fixed_means: list[list[float]] = [[] for _ in range(2 + len(oneshot_names))]
        per_seed: dict[tuple[int, int], list[float]] = {}  # (column, seed) -> task scores
        for task in tasks:
            row = [reference(task, keep, "full"), reference(task, keep, "random")]
            row += [oneshot.get((task, keep), {}).get(m) for m in oneshot_names]
            cells_text = []
            for i, value in enumerate(row):
                if value is not None:
                    fixed_means[i].append(value)
                cells_text.append("-" if value is None else f"{value:.3f}")
            for c, (strategy, key, _) in enumerate(columns):
                values = []
                for seed in args.seeds:
                    value = method(task, keep, strategy, seed, key).get("test")
                    if value is not None:
                        values.append(value)
                        per_seed.setdefault((c, seed), []).append(value)
                cells_text.append(spread(values) if values else "-")
            print(f"| {task} | " + " | ".join(cells_text) + " |")
        mean_text = [f"{statistics.mean(m):.3f}" if len(m) == len(tasks) else "-" for m in fixed_means]
        for c in range(len(columns)):
            means = [
                statistics.mean(per_seed[(c, seed)]) for seed in args.seeds
                if len(per_seed.get((c, seed), [])) == len(tasks)
            ]
            mean_text.append(spread(means) if means else "-")
        print("| **mean** | " + " | ".join(mean_text) + " |")

    polished = [s for s in args.strategies if s in POLISHED]
    if polished:
        print("\n### polishing (mean over tasks and seeds)\n")
        print("| keep | cells | kept on dev | KL before | KL after | polish s | share of campaign |")
        print("|---|---|---|---|---|---|---|")
        for keep in args.keeps:
            for strategy in polished:
                rows = [results.get((t, keep, strategy, seed), {}) for t in tasks for seed in args.seeds]
                rows = [r for r in rows if r.get("methods", {}).get("polish", {}).get("id")]
                if not rows:
                    continue
                polish_rows = [r["methods"]["polish"] for r in rows]
                kept = sum(r.get("chosen") == "polish" for r in rows)
                seconds = [r.get("polish_seconds", 0.0) for r in rows]
                share = [p / (p + r["search_seconds"]) for p, r in zip(seconds, rows, strict=True)]
                print(f"| {keep} | {strategy} ({len(rows)}) | {kept} of {len(rows)} "
                      f"| {statistics.mean(p['kl_before'] for p in polish_rows):.4f} "
                      f"| {statistics.mean(p['kl_after'] for p in polish_rows):.4f} "
                      f"| {statistics.mean(seconds):.1f} | {statistics.mean(share):.1%} |")

    if args.curves:
        points = [p for p in (10, 25, 50, 100, 150, 200, 300, 400) if p <= args.budget]
        print("\n### best search score vs evaluations (mean over tasks and seeds; range of the per-seed means at the last point)\n")
        print("| keep | strategy | " + " | ".join(str(p) for p in points) + " | range at end |")
        print("|---|---|" + "---|" * (len(points) + 1))
        for keep in args.keeps:
            for strategy in args.strategies:
                seed_means = []
                for seed in args.seeds:
                    curves = [best_so_far(run_dir_of(args.out, t, keep, strategy, seed), points) for t in tasks]
                    curves = [c for c in curves if c]
                    # coordinate descent may stop early: its curve ends at its last point
                    curves = [c + [c[-1]] * (len(points) - len(c)) for c in curves]
                    if len(curves) == len(tasks):
                        seed_means.append([statistics.mean(c[i] for c in curves) for i in range(len(points))])
                if seed_means:
                    mean = [statistics.mean(s[i] for s in seed_means) for i in range(len(points))]
                    ends = [s[-1] for s in seed_means]
                    print(
                        f"| {keep} | {strategy} | " + " | ".join(f"{v:.3f}" for v in mean)
                        + f" | {min(ends):.3f}-{max(ends):.3f} |"
                    )


if __name__ == "__main__":
    main()
