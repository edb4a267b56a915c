"""One-shot pruning: NAEE enumeration speed, dynamic-skipping speed, and the quality table.

    python bench/naee.py speed                       # tiny random models (tiny-moe dimensions)
    python bench/naee.py speed --device cuda --hidden 4096 --intermediate 14336 --layers 1 \
        --dtype bfloat16 --tokens 16384               # one Mixtral-8x7B-dimension layer (GPU)
    python bench/naee.py quality --model builtin:tiny-moe --out bench/naee_quality.json

`speed`: seconds per layer of NAEE (layerwise, keep 4 and 2 of 8; progressive keep 4), of the
beam variant on 16 and 64 experts, of the criteria pass, and forward tokens/s with and without
dynamic skipping. `quality`: test-split scores of every method on every built-in task at keep 4
and 2, with and without skipping (thresholds calibrated on the pruned model with the method's
own calibration data), as a markdown table (and JSON with --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from eep.candidate import Candidate
from eep.models.loading import load_model, parse_dtype
from eep.models.skipping import installed_skipping, set_skipping
from eep.oneshot.calibration import (
    Calibration,
    build_calibration,
    parse_calibration,
    task_calibration,
)
from eep.oneshot.criteria import CRITERIA, criteria_scores, random_candidate
from eep.oneshot.naee import naee_prune
from eep.oneshot.skipping import calibrate_thresholds, with_skip_thresholds


def _model(args, experts: int, layers: int | None = None) -> torch.nn.Module:
    config = MixtralConfig(
        vocab_size=64, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=layers or args.layers, num_attention_heads=4, num_key_value_heads=4,
        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=max(64, args.row),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=parse_dtype(args.dtype), experts_implementation="eager"
    )
    return model.to(args.device).eval()


def _calibration(args) -> Calibration:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 64, (max(1, args.tokens // args.row), args.row), generator=g).tolist()
    return Calibration.from_ids(rows, batch_size=args.batch)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(args) -> None:
    """Print markdown rows of NAEE / criteria / skipping timings."""
    calibration = _calibration(args)
    print(f"calibration: {calibration.tokens} tokens in {len(calibration)} batches; "
          f"d={args.hidden} I={args.intermediate} {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads")
    if not args.skipping_only:
        _naee_speed(args, calibration)
    _skipping_speed(args, calibration)


def _naee_speed(args, calibration: Calibration) -> None:
    print("| run | experts | keep | subsets/layer | passes | total s | s per layer | scoring s per layer |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [("layerwise", 8, 4, {}), ("layerwise", 8, 2, {}), ("progressive", 8, 4, {}),
            ("layerwise", 16, 8, {}), ("beam 1", 16, 8, {"max_subsets": 1}),
            ("beam 4", 16, 8, {"max_subsets": 1, "beam_width": 4})]
    if args.many:
        runs.append(("beam 1", 64, 32, {"max_subsets": 1}))
    for name, experts, keep, options in runs:
        model = _model(args, experts)
        order = "progressive" if name == "progressive" else "layerwise"
        _sync(args.device)
        start = time.perf_counter()
        result = naee_prune(model, calibration, keep, order=order, **options)
        _sync(args.device)
        total = time.perf_counter() - start
        subsets = max(len(losses) for losses in result.losses)
        layers = len(result.kept)
        print(f"| {name} | {experts} | {keep} | {subsets} | {result.passes} | {total:.2f} | "
              f"{total / layers:.3f} | {statistics.mean(result.layer_seconds):.3f} |")
    model = _model(args, 8)
    start = time.perf_counter()
    criteria_scores(model, calibration)
    print(f"\ncriteria pass (frequency + soft activation + REAP): {time.perf_counter() - start:.2f} s")


def _skipping_speed(args, calibration: Calibration) -> None:
    model = _model(args, 8)
    thresholds = calibrate_thresholds(model, calibration)
    x = torch.randint(3, 64, (args.batch, args.row), generator=torch.Generator().manual_seed(1)).to(args.device)
    for label, value in (("no skipping", None), ("median thresholds", thresholds)):
        skipping = set_skipping(model, value)
        with torch.no_grad():
            model(x)  # warm-up
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(args.repeats):
                model(x)
            _sync(args.device)
        seconds = (time.perf_counter() - start) / args.repeats
        skipped = f", {skipping.skipped_fraction():.1%} of expert calls skipped" if skipping else ""
        print(f"forward {label}: {x.numel() / seconds:,.0f} tokens/s{skipped}")
    set_skipping(model, None)


def quality(args) -> None:
    """Score every method on every built-in task's test split; print a markdown table."""
    from eep.fitness import Evaluator, surgery_for
    from eep.tasks.synthetic import SYNTHETIC_TASKS

    loaded = load_model(args.model, args.device, args.dtype)
    net = loaded.model
    surgery = surgery_for(net)
    agnostic = build_calibration(parse_calibration("builtin", samples=args.samples), net, loaded.tokenizer)
    rows: list[dict] = []
    tasks = args.tasks or list(SYNTHETIC_TASKS)
    for task in tasks:
        evaluator = Evaluator(loaded, task, split="test", max_examples=args.test_examples)
        specific = build_calibration(task_calibration(evaluator.spec), net, loaded.tokenizer)
        _restore(net, surgery)
        rows += _score(evaluator, surgery, None, specific, "full", surgery.num_experts)
        for keep in args.keeps:
            for seed in range(args.random_draws):
                cand = random_candidate(surgery.num_layers, surgery.num_experts, keep, seed)
                rows += _score(evaluator, surgery, cand, specific, f"random#{seed}", keep)
            _restore(net, surgery)
            scores = criteria_scores(net, specific)
            for name in CRITERIA:
                rows += _score(evaluator, surgery, scores.candidate(name, keep), specific, name, keep)
            for label, calibration in (("naee-agnostic", agnostic), ("naee-specific", specific)):
                _restore(net, surgery)
                cand = naee_prune(net, calibration, keep).candidate()
                rows += _score(evaluator, surgery, cand, calibration, label, keep)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows, tasks))
    print(skipping_summary(rows))


def skipping_summary(rows: list[dict]) -> str:
    """Skipped share of expert calls on the test split, and evaluation time with / without."""
    lines = ["| keep | skipped expert calls (mean, min-max) | eval s without | eval s with | ratio |",
             "|---|---|---|---|---|"]
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        on = [r for r in rows if r["keep"] == keep and r["skip"]]
        off = [r for r in rows if r["keep"] == keep and not r["skip"]]
        share = [r["skipped_fraction"] for r in on]
        with_s, without_s = sum(r["seconds"] for r in on), sum(r["seconds"] for r in off)
        lines.append(
            f"| {keep} | {statistics.mean(share):.1%} ({min(share):.1%}-{max(share):.1%}) | "
            f"{without_s:.1f} | {with_s:.1f} | {with_s / without_s:.2f} |"
        )
    return "\n".join(lines)


def _restore(net, surgery) -> None:
    surgery.restore()
    set_skipping(net, None)


def _score(evaluator, surgery, candidate, calibration, label: str, keep: int) -> list[dict]:
    """Test score of `candidate` without and with skipping (thresholds from the pruned model)."""
    net = evaluator.model
    out = []
    for skip in (False, True):
        cand = candidate
        if skip:
            _restore(net, surgery)
            if cand is not None:
                surgery.apply(cand)
            thresholds = calibrate_thresholds(net, calibration)
            base = cand or Candidate.identity(surgery.num_layers, surgery.num_experts)
            cand = with_skip_thresholds(base, thresholds)
        result = evaluator.evaluate(cand)
        skipping = installed_skipping(net)
        out.append({
            "task": evaluator.spec.name, "keep": keep, "method": label, "skip": skip,
            "score": result.score, "seconds": result.seconds,
            "skipped_fraction": skipping.skipped_fraction() if skipping else 0.0,
        })
        print(json.dumps(out[-1]), flush=True)
    return out


def table(rows: list[dict], tasks: list[str]) -> str:
    """Markdown: one row per (keep, method, skip), one column per task plus the mean."""
    def cell(task, keep, method, skip):
        found = [r["score"] for r in rows if r["task"] == task and r["keep"] == keep
                 and r["skip"] == skip and (r["method"] == method or r["method"].startswith(method + "#"))]
        return statistics.mean(found) if found else None

    lines = ["| keep | method | skip | " + " | ".join(tasks) + " | mean |",
             "|---|---|---|" + "---|" * (len(tasks) + 1)]
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    methods = ["full", "random", *CRITERIA, "naee-agnostic", "naee-specific"]
    for keep in keeps:
        for method in methods:
            for skip in (False, True):
                values = [cell(t, keep, method, skip) for t in tasks]
                if all(v is None for v in values):
                    continue
                shown = [f"{v:.3f}" if v is not None else "" for v in values]
                mean = statistics.mean(v for v in values if v is not None)
                lines.append(f"| {keep} | {method} | {'yes' if skip else 'no'} | " + " | ".join(shown) + f" | {mean:.3f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments and run the chosen benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "quality"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    # speed
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--row", type=int, default=64, help="tokens per calibration row")
    parser.add_argument("--batch", type=int, default=8, help="rows per calibration batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--many", action="store_true", help="also greedy on 64 experts")
    parser.add_argument("--skipping-only", action="store_true", help="only the forward with/without skipping")
    # quality
    parser.add_argument("--model", default="builtin:tiny-moe")
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--keeps", nargs="*", type=int, default=[4, 2])
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--samples", type=int, default=700, help="task-agnostic calibration texts")
    parser.add_argument("--test-examples", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "speed":
        if args.dtype == "auto":
            args.dtype = "float32"
        speed(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
