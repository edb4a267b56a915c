"""Quality of the shipped tiny MoE: per-task test accuracy, routing per task, random pruning.

    python bench/tiny_model_quality.py [--model eep/builtin/tiny-moe] [--n 200] [--draws 5]

Pruning keeps 4 of 8 experts per layer by setting the dropped experts' router logits to -inf
(a forward hook on each gate), which gives exactly the logits of the sliced stock checkpoint.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eep.builtin.train_tiny import collate, encode, evaluate_tasks
from eep.tasks.synthetic import SYNTHETIC_TASKS, make_examples

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def routing_histograms(model, tokenizer, n: int) -> dict[str, torch.Tensor]:
    """Per task: [layers, experts] share of top-k choices over all tokens of its test examples."""
    top_k = model.config.num_experts_per_tok
    result = {}
    for name in SYNTHETIC_TASKS:
        examples = make_examples(name, "test", n)
        rows = encode(tokenizer, [(ex.prompt, ex.answers[0]) for ex in examples])
        input_ids, attention_mask, _ = collate(rows, tokenizer.pad_token_id)
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        real = attention_mask.reshape(-1).bool()
        counts = []
        for logits in out.router_logits:  # per layer: [batch*seq, experts]
            chosen = logits[real].topk(top_k, dim=-1).indices.reshape(-1)
            counts.append(torch.bincount(chosen, minlength=logits.shape[-1]).float())
        hist = torch.stack(counts)  # [layers, experts]
        result[name] = hist / hist.sum(-1, keepdim=True)
    return result


def keep_only(model, kept: list[list[int]]) -> list:
    """Mask every expert outside kept[layer] out of its router; returns the hook handles."""
    handles = []
    for layer, experts in zip(model.model.layers, kept, strict=True):
        gate = layer.mlp.gate
        mask = torch.full((gate.num_experts,), float("-inf"))
        mask[experts] = 0.0

        def hook(module, args, output, mask=mask):
            logits = output[0] + mask  # [tokens, experts]
            probs = torch.softmax(logits.float(), dim=-1)
            top_value, top_index = probs.topk(module.top_k, dim=-1)
            return logits, top_value / top_value.sum(-1, keepdim=True), top_index

        handles.append(gate.register_forward_hook(hook))
    return handles


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
    torch.set_num_threads(2)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model.set_experts_implementation("eager")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layers, experts = model.config.num_hidden_layers, model.config.num_local_experts

    start = time.time()
    full = evaluate_tasks(model, tokenizer, "test", n=args.n)
    seconds = time.time() - start
    print(f"full model, test accuracy ({args.n} examples per task, {seconds:.1f}s):")
    for name, acc in full.items():
        print(f"  {name:8s} {acc:.3f}")
    print(f"  mean     {mean(full.values()):.3f}")

    hists = routing_histograms(model, tokenizer, args.n)
    print("\nrouting: share of top-k choices per expert (%), per layer and task")
    for layer in range(layers):
        print(f"layer {layer}: " + " ".join(f"e{e:<3d}" for e in range(experts)))
        for name in SYNTHETIC_TASKS:
            row = " ".join(f"{100 * v:4.0f}" for v in hists[name][layer].tolist())
            print(f"  {name:8s} {row}")
    # Specialisation in one number per layer: mean total-variation distance between two tasks'
    # histograms (0 = every task routes alike, 1 = disjoint experts).
    print("\nmean pairwise total-variation distance between task routing histograms:")
    for layer in range(layers):
        tvs = [
            0.5 * (hists[a][layer] - hists[b][layer]).abs().sum().item()
            for i, a in enumerate(SYNTHETIC_TASKS)
            for b in SYNTHETIC_TASKS[i + 1 :]
        ]
        print(f"  layer {layer}: {mean(tvs):.2f} (max {max(tvs):.2f})")

    print(f"\nrandom pruning, keep {args.keep} of {experts} experts per layer:")
    pruned_means = []
    for draw in range(args.draws):
        rng = random.Random(draw)
        kept = [sorted(rng.sample(range(experts), args.keep)) for _ in range(layers)]
        handles = keep_only(model, kept)
        acc = evaluate_tasks(model, tokenizer, "test", n=args.n)
        for handle in handles:
            handle.remove()
        pruned_means.append(mean(acc.values()))
        per_task = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
        print(f"  draw {draw} kept {kept}: mean {pruned_means[-1]:.3f} ({per_task})")
    print(
        f"  mean over {args.draws} draws: {mean(pruned_means):.3f} "
        f"(min {min(pruned_means):.3f}, max {max(pruned_means):.3f}); "
        f"full model {mean(full.values()):.3f}"
    )

    overall = torch.stack([hists[name] for name in SYNTHETIC_TASKS]).mean(0)  # [layers, experts]
    kept = [sorted(overall[layer].topk(args.keep).indices.tolist()) for layer in range(layers)]
    handles = keep_only(model, kept)
    acc = evaluate_tasks(model, tokenizer, "test", n=args.n)
    for handle in handles:
        handle.remove()
    per_task = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
    print(f"most-used {args.keep} per layer (all tasks) {kept}: mean {mean(acc.values()):.3f}")
    print(f"  ({per_task})")


if __name__ == "__main__":
    main()
