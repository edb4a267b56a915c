"""`eep polish`: tune a candidate's R and M by gradient descent on the KL to the full model (`eep.polish`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from eep.candidate import Candidate, CandidateError
from eep.config import PolishSettings
from eep.fitness import DEFAULT_BATCH_SIZE, Evaluator, surgery_for
from eep.models.loading import load_model, parse_device
from eep.oneshot import parse_calibration
from eep.polish import PolishOutcome, keep_polished, polish_on_calibration, polish_on_split

NAME = "polish"
HELP = "tune a candidate's coefficients (experts frozen) to lower its KL to the full model"

# PolishSettings field -> the flag that sets it (errors name the flag).
FLAGS = {
    "steps": "--steps",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "kl_top": "--kl-top",
    "max_seconds": "--max-seconds",
    "seed": "--seed",
    "tune": "--tune",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `eep polish`."""
    parser.add_argument("--model", required=True, help="builtin:NAME, a local folder or a hub id")
    parser.add_argument("--candidate", required=True, help="candidate .safetensors file to polish")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--task", help="rows of the task's split (prompt + gold answer); the dev split decides"
    )
    data.add_argument(
        "--calibration",
        help="calibration text: builtin (synthetic mix), FILE.jsonl, FILE.yaml or hf:PATH[:NAME]",
    )
    parser.add_argument("--out", required=True, help="candidate .safetensors file to write")
    parser.add_argument(
        "--split", default="search", choices=("search",),
        help="task split to polish on: search (dev is the judge; test stays unseen)",
    )
    parser.add_argument("--samples", type=int, help="calibration texts to use")
    defaults = PolishSettings()
    parser.add_argument("--steps", type=int, help=f"Adam steps (default {defaults.steps})")
    parser.add_argument("--lr", type=float, help=f"Adam learning rate (default {defaults.lr})")
    parser.add_argument(
        "--batch-size", type=int, help=f"rows per step (default {defaults.batch_size})"
    )
    parser.add_argument(
        "--kl-top", type=int, help=f"full-model tokens kept per position (default {defaults.kl_top})"
    )
    parser.add_argument("--max-seconds", type=float, help="stop the steps after this long")
    parser.add_argument(
        "--tune", help="coefficients to move, comma-separated: merge,router (default both)"
    )
    parser.add_argument("--seed", type=int, help=f"row order (default {defaults.seed})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def settings_from(args: argparse.Namespace) -> PolishSettings:
    """PolishSettings from the flags given (the others keep their defaults); errors name the flag."""
    given = {
        name: getattr(args, name)
        for name in ("steps", "lr", "batch_size", "kl_top", "max_seconds", "seed")
        if getattr(args, name) is not None
    }
    if args.tune is not None:
        given["tune"] = [t.strip() for t in args.tune.split(",") if t.strip()]
    try:
        return PolishSettings(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = FLAGS.get(str(err["loc"][0]), str(err["loc"][0])) if err["loc"] else "settings"
        raise ValueError(f"{flag}: {err['msg'].lower()} (got {err['input']!r})") from None


def run(args: argparse.Namespace) -> int:
    """Polish, choose what to write, print before and after."""
    # Everything that can be refused is refused before a model loads.
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give the candidate's .safetensors file name")
    settings = settings_from(args)
    parse_device(args.device)
    if args.samples is not None and args.task:
        raise ValueError("--samples goes with --calibration (--task uses the whole split)")
    candidate = Candidate.load(args.candidate)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.task:
        return _run_task(args, candidate, settings)
    spec = parse_calibration(args.calibration, samples=args.samples)
    loaded = load_model(args.model, args.device, args.dtype)
    _check(loaded.model, candidate, args.candidate)
    outcome = polish_on_calibration(loaded, candidate, spec, settings)
    _print_polish(outcome, f"calibration {spec.describe()}")
    if not outcome.improved:
        print("the KL did not go down: wrote the original candidate unchanged")
    path = outcome.candidate.save(args.out)
    print(f"wrote {path}")
    return 0


def _run_task(args: argparse.Namespace, candidate: Candidate, settings: PolishSettings) -> int:
    """Polish on the task's split; keep the result only if it beats the original on dev."""
    search = Evaluator(
        args.model, args.task, split=args.split, device=args.device, dtype=args.dtype,
        fitness="kl", kl_top=settings.kl_top,
    )
    _check(search.model, candidate, args.candidate)
    dev = Evaluator(search.loaded, search.spec, "dev", batch_size=DEFAULT_BATCH_SIZE)
    outcome = polish_on_split(search, candidate, settings)
    _print_polish(outcome, f"{search.spec.name} [{args.split}], {len(search.examples)} rows")
    dev_before = dev.evaluate(candidate)
    line = f"dev {dev_before.metric}: {dev_before.score:.4f}"
    chosen = candidate
    if not outcome.improved:
        print(f"{line}; the KL did not go down: wrote the original candidate unchanged")
    else:
        dev_after = dev.evaluate(outcome.candidate)
        line += f" -> {dev_after.score:.4f}"
        if keep_polished(dev_before.score, dev_after.score, outcome.improved):
            chosen = outcome.candidate
            print(f"{line}: kept the polished candidate")
        else:
            print(f"{line}: below the original, wrote the original candidate unchanged")
    path = chosen.save(args.out)
    print(f"wrote {path}")
    return 0


def _check(model, candidate: Candidate, path: str) -> None:
    """The candidate fits the loaded model, or an error naming its file."""
    try:
        surgery_for(model).check(candidate)
    except CandidateError as exc:
        raise CandidateError(f"--candidate {path}: {exc}") from None


def _print_polish(outcome: PolishOutcome, rows: str) -> None:
    per_step = outcome.step_seconds / max(outcome.steps, 1)
    print(
        f"polish: {outcome.steps} steps ({per_step:.3f} s each), tuned {', '.join(outcome.tuned)}, "
        f"{outcome.seconds:.1f} s in all"
    )
    print(
        f"KL(full || candidate) on {rows}: {outcome.kl_before:.4f} -> {outcome.kl_polished:.4f}"
    )
