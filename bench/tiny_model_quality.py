"""Quality of the shipped tiny MoE: per-task test accuracy, routing per task, random pruning.

    python bench/tiny_model_quality.py [--model eep/builtin/tiny-moe] [--n 200] [--draws 5]

Pruning keeps 4 of 8 experts per layer with `Surgery` (the model really holds the kept experts);
routing histograms come from `eep.routing_stats` (what `eep inspect --routing` prints).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from eep.builtin.train_tiny import evaluate_tasks
from eep.candidate import Candidate
from eep.models.families import detect_family, get_num_experts
from eep.models.loading import load_model
from eep.models.surgery import Surgery
from eep.routing_stats import routing_histograms
from eep.tasks.synthetic import SYNTHETIC_TASKS

ROOT = Path(__file__).resolve().parents[1]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "eep" / "builtin" / "tiny-moe")
    parser.add_argument("--n", type=int, default=200, help="test examples per task")
    parser.add_argument("--draws", type=int, default=5, help="random 4-of-8 pruning draws")
    parser.add_argument("--keep", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    loaded = load_model(str(args.model), "cpu", "float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    surgery = Surgery(model)
    layers = surgery.num_layers
    experts = get_num_experts(model.config, detect_family(model.config))

    start = time.time()
    full = evaluate_tasks(model, tokenizer, "test", n=args.n)
    seconds = time.time() - start
    print(f"full model, test accuracy ({args.n} examples per task, {seconds:.1f}s):")
    for name, acc in full.items():
        print(f"  {name:8s} {acc:.3f}")
    print(f"  mean     {mean(full.values()):.3f}")

    hists = routing_histograms(loaded, list(SYNTHETIC_TASKS), split="test", samples=args.n)
    print("\n" + hists.format())
    pairs = [(a, b) for a in range(len(hists.tasks)) for b in range(a + 1, len(hists.tasks))]
    most = [max(hists.distance(a, b)[layer].item() for a, b in pairs) for layer in range(layers)]
    print("largest pairwise distance per layer: " + ", ".join(f"{d:.2f}" for d in most))

    print(f"\nrandom pruning, keep {args.keep} of {experts} experts per layer:")
    pruned_means = []
    for draw in range(args.draws):
        rng = random.Random(draw)
        kept = [sorted(rng.sample(range(experts), args.keep)) for _ in range(layers)]
        surgery.apply(Candidate.from_kept(kept, experts))
        acc = evaluate_tasks(model, tokenizer, "test", n=args.n)
        surgery.restore()
        pruned_means.append(mean(acc.values()))
        per_task = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
        print(f"  draw {draw} kept {kept}: mean {pruned_means[-1]:.3f} ({per_task})")
    print(
        f"  mean over {args.draws} draws: {mean(pruned_means):.3f} "
        f"(min {min(pruned_means):.3f}, max {max(pruned_means):.3f}); "
        f"full model {mean(full.values()):.3f}"
    )

    overall = hists.shares.mean(0)  # [layers, experts]
    kept = [sorted(overall[layer].topk(args.keep).indices.tolist()) for layer in range(layers)]
    surgery.apply(Candidate.from_kept(kept, experts))
    acc = evaluate_tasks(model, tokenizer, "test", n=args.n)
    surgery.restore()
    per_task = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
    print(f"most-used {args.keep} per layer (all tasks) {kept}: mean {mean(acc.values()):.3f}")
    print(f"  ({per_task})")


if __name__ == "__main__":
    main()
