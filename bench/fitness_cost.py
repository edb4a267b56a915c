"""Fitness kinds side by side: cost per candidate, rank agreement with test accuracy, and campaigns.

    python bench/fitness_cost.py rank --model builtin:deep-moe --random 40 --from-runs runs/study/deep
    python bench/fitness_cost.py campaigns --model builtin:deep-moe --tasks add --keep 2 --seconds 90 --seeds 0 1 2

`rank`: per built-in task, a fixed set of candidates (random prunings at keep 4 and 2, plus pure
and merged candidates of earlier EEP campaigns of that task found under `--from-runs`) is scored
on the search split by every fitness kind (accuracy = the task's metric, likelihood, kl) and on
the test split by the task's metric. Reported per kind: seconds per candidate (the Evaluator's own
timing, surgery included), forward tokens, the ratio to the floor (the same candidate's surgery
plus one batched forward over the teacher-forced rows, timed in the same run), and the Spearman
rank correlation between the fitness and test accuracy over the candidates.

`campaigns`: EEP (the authors' schedule shape, 31 inits) at equal wall time (`budget.max_seconds`)
for every fitness kind, with and without early rejection, over seeds; reported: the final test
score (the task's metric, dev re-ranking by the task's metric as always), evaluations, examples
scored per evaluation and the rejected share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

KINDS = ("accuracy", "likelihood", "kl")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values))
        sorted_values = np.asarray(values)[order]
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
                j += 1
            out[order[i : j + 1]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def candidates_for(
    task: str, layers: int, experts: int, random: int, runs: list[str], per_run: int, seed: int
) -> list:
    """Random prunings at keep 4 and 2, then up to `per_run` candidates per earlier EEP run of `task`."""
    from eep.candidate import Candidate

    out = []
    for keep in (4, 2):
        for i in range(random):
            out.append(Candidate.random_pruning(layers, experts, keep, generator=seed * 10_000 + keep * 1000 + i))
    for root in runs:
        for run in sorted(Path(root).glob(f"{task}-k*-eep*")):
            files = sorted((run / "candidates").glob("*.safetensors"))
            step = max(1, len(files) // per_run)  # spread over the run: inits to merged ones
            out.extend(Candidate.load(f) for f in files[::step][:per_run])
    return out


def rank_task(args: tuple[str, str, int, list[str], int, int, int]) -> dict:
    """Every kind's cost and Spearman correlation with test accuracy on one task."""
    model, task, random, runs, per_run, search, batch = args
    torch.set_num_threads(1)
    from eep.fitness import Evaluator
    from eep.models.loading import load_model
    from eep.tasks.synthetic import max_new_tokens, task_kind

    spec = {
        "name": task, "source": {"kind": "builtin", "name": task}, "scorer": task_kind(task),
        "splits": {"search": search, "dev": 64, "test": 200, "seed": 0},
    }
    if task_kind(task) == "generate":
        spec["max_new_tokens"] = max_new_tokens(task)
    loaded = load_model(model, "cpu", "auto")
    evaluators = {k: Evaluator(loaded, spec, "search", batch_size=batch, fitness=k) for k in KINDS}
    test = Evaluator(loaded, spec, "test", batch_size=batch)
    forced = evaluators["likelihood"]
    cands = candidates_for(task, forced.num_layers, forced.num_experts, random, runs, per_run, 0)
    rows: dict[str, list] = {k: [] for k in (*KINDS, "test", "floor")}
    for ev in evaluators.values():  # warm-up (and the kl reference)
        ev.evaluate(cands[0])
    for cand in cands:
        for kind, ev in evaluators.items():
            rows[kind].append(ev.evaluate(cand))
        rows["test"].append(test.evaluate(cand).score)
        # The floor: surgery + one batched forward over the teacher-forced rows, no scoring.
        start = time.perf_counter()
        # Inference mode as in the Evaluator: its working tensors are inference tensors.
        with torch.inference_mode():
            forced.surgery.apply(cand)
            for b in forced._batches:
                loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             position_ids=b.position_ids, use_cache=False, logits_to_keep=1)
        rows["floor"].append(time.perf_counter() - start)
    floor = statistics.median(rows["floor"])
    out = {"task": task, "candidates": len(cands), "floor_s": floor, "kinds": {}}
    for kind in KINDS:
        results = rows[kind]
        seconds = statistics.median(r.seconds for r in results)
        out["kinds"][kind] = {
            "seconds": seconds,
            "tokens": statistics.median(r.tokens for r in results),
            "over_floor": seconds / floor,
            "spearman": spearman([r.score for r in results], rows["test"]),
        }
    print(json.dumps(out), flush=True)
    return out


def rank(args) -> None:
    """The `rank` table."""
    from eep.tasks.synthetic import SYNTHETIC_TASKS

    tasks = args.tasks or list(SYNTHETIC_TASKS)
    work = [
        (args.model, t, args.random, args.from_runs, args.per_run, args.search, args.batch_size)
        for t in tasks
    ]
    with ProcessPoolExecutor(args.jobs) as ex:
        results = list(ex.map(rank_task, work))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("\n| task | candidates | floor s | " + " | ".join(
        f"{k} s (x floor) | {k} Spearman" for k in KINDS) + " |")
    print("|---|---|---|" + "---|---|" * len(KINDS))
    for r in results:
        cells = [f"{r['kinds'][k]['seconds']:.3f} ({r['kinds'][k]['over_floor']:.2f}x) | {r['kinds'][k]['spearman']:.2f}" for k in KINDS]
        print(f"| {r['task']} | {r['candidates']} | {r['floor_s']:.3f} | " + " | ".join(cells) + " |")
    means = [
        f"{statistics.mean(r['kinds'][k]['over_floor'] for r in results):.2f}x | "
        f"{statistics.mean(r['kinds'][k]['spearman'] for r in results):.2f}" for k in KINDS
    ]
    print("| **mean** | | | " + " | ".join(means) + " |")


def campaign_one(args: tuple[dict, str]) -> dict:
    """Run one campaign (reused when finished); return its summary."""
    data, run_dir = args
    torch.set_num_threads(1)
    from eep.campaign import run_campaign
    from eep.config import config_from_dict

    path = Path(run_dir) / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())
    return run_campaign(config_from_dict(data), run_dir=run_dir, quiet=True).summary


def campaigns(args) -> None:
    """The `campaigns` table."""
    from bench.quality import campaign_dict

    cells, work = [], []
    for task in args.tasks or ["add"]:
        for kind in KINDS:
            for reject in (False, True):
                for seed in args.seeds:
                    data = campaign_dict(task, args.keep, "eep", 401, (args.search, 64, 200), seed,
                                         model=args.model, batch_size=args.batch_size)
                    data["fitness"] = {"kind": kind, "early_rejection": {} if reject else None}
                    data["budget"] = {"max_seconds": args.seconds}
                    cells.append((task, kind, reject, seed))
                    work.append((data, f"{args.out}/{task}-k{args.keep}-{kind}-{'rej' if reject else 'all'}-s{seed}"))
    with ProcessPoolExecutor(args.jobs) as ex:
        summaries = dict(zip(cells, ex.map(campaign_one, work), strict=True))
    print(f"\n### EEP at keep {args.keep}, {args.seconds:.0f} s of search each (test split; seeds {args.seeds})\n")
    print("| task | fitness | early rejection | test (mean, min-max) | evaluations | examples / evaluation | rejected |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks or ["add"]:
        for kind in KINDS:
            for reject in (False, True):
                runs = [summaries[(task, kind, reject, s)] for s in args.seeds]
                tests = [r["methods"]["eep"]["test"] for r in runs]
                evals = [r["search_evaluations"] for r in runs]
                per_eval = [r["search_examples"] / max(1, r["search_evaluations"]) for r in runs]
                rejected = [r["search_rejected"] / max(1, r["search_evaluations"]) for r in runs]
                print(
                    f"| {task} | {kind} | {'on' if reject else 'off'} | {statistics.mean(tests):.3f} "
                    f"({min(tests):.3f}-{max(tests):.3f}) | {statistics.mean(evals):.0f} | "
                    f"{statistics.mean(per_eval):.1f} | {statistics.mean(rejected):.0%} |"
                )


def main() -> None:
    """Parse arguments and run the chosen part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("rank", "campaigns"))
    parser.add_argument("--model", default="builtin:deep-moe")
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--search", type=int, default=64, help="search-split examples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 2))
    parser.add_argument("--random", type=int, default=40, help="rank: random prunings per keep (4 and 2)")
    parser.add_argument("--from-runs", nargs="*", default=[], help="rank: folders of earlier campaigns")
    parser.add_argument("--per-run", type=int, default=20, help="rank: candidates taken per earlier run")
    parser.add_argument("--keep", type=int, default=2, help="campaigns: experts kept per layer")
    parser.add_argument("--seconds", type=float, default=90, help="campaigns: search wall time each")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="rank: JSON file; campaigns: run folder (default runs/fitness)")
    args = parser.parse_args()
    if args.what == "rank":
        rank(args)
    else:
        args.out = args.out or "runs/fitness"
        campaigns(args)


if __name__ == "__main__":
    main()
