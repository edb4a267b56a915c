"""Parallel efficiency of the Ray pool: evaluations/minute with 1 and N workers on this CPU.

    .venv/bin/python bench/ray_pool.py                  # 1 and 2 workers, tiny model, 40 evals each
    .venv/bin/python bench/ray_pool.py --workers 1 2 --evaluations 60 --examples 100

Each worker is a Ray actor with one CPU and one torch thread holding a tiny MoE
(`builtin:tiny-moe` when its weights are there, else a tiny random Mixtral with the character
tokenizer); candidates are random 4-of-8 prunings scored on the `add` task's search split. The
driver keeps every actor busy (submit on completion, as a campaign does); the rate is measured
after every actor has loaded and scored one warm-up candidate. Efficiency = rate(N) / (N *
rate(1)). Utilisation = evaluation seconds / (N * wall seconds): the share of time the actors
were scoring, i.e. what the pool's dispatch costs, apart from how fast each evaluation runs.
Prints one JSON object; the machine's load average is part of it because other processes on
the same cores lower the efficiency (not the utilisation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from eep.candidate import Candidate
from eep.config import config_from_dict
from eep.distributed import ray_runtime
from eep.distributed.pool import Job, WorkerSpec
from eep.models.loading import BUILTIN_MODELS

RANDOM_MODEL = "tiny random Mixtral: 4 layers, hidden 128, 8 experts of 256, top-2, char vocab"


def tiny_model_dir(tmp: Path) -> str:
    """`builtin:tiny-moe` when trained, else a tiny random Mixtral with the char tokenizer."""
    if (BUILTIN_MODELS["tiny-moe"] / "config.json").is_file():
        return "builtin:tiny-moe"
    from eep.builtin.tokenizer import build_tokenizer
    from eep.models.testing import tiny_model

    path = tmp / "tiny-mixtral"
    tiny_model("mixtral", num_layers=4, hidden_size=128, intermediate_size=256, head_dim=32).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def measure(model: str, workers: int, evaluations: int, examples: int, seed: int = 0) -> dict:
    """Steady-state evaluations/minute of a RayPool with `workers` actors."""
    from eep.distributed.ray_pool import RayPool

    config = config_from_dict({
        "model": model,
        "task": _task(examples),
        "keep": 4,
        "strategy": {"kind": "random", "budget": evaluations},
        "workers": workers,
        "resources": {"num_cpus": 1},
        "evaluation": {"device": "cpu", "threads": 1},
    })
    spec = WorkerSpec(model=model, task=config.task.model_dump(mode="json"), device="cpu",
                      threads=1, splits=("search",))
    generator = torch.Generator().manual_seed(seed)
    num_layers = _num_moe_layers(model)

    def job() -> Job:
        return Job(Candidate.random_pruning(num_layers, 8, 4, generator))

    started = time.perf_counter()
    pool = RayPool(spec, config, poll_seconds=0.5)
    try:
        while pool.size < workers or pool.idle() < workers - pool.in_flight:
            pool.wait(timeout=1.0)
        ready = time.perf_counter() - started
        for _ in range(workers):  # warm-up: one candidate per actor
            pool.submit(job())
        while pool.in_flight:
            pool.wait()
        done, seconds = [], []
        for _ in range(workers):
            pool.submit(job())
        submitted = workers
        start = time.perf_counter()
        while len(done) < evaluations:
            for finished in pool.wait():
                done.append(finished)
                seconds.append(finished.result.seconds)
                if submitted < evaluations:
                    pool.submit(job())
                    submitted += 1
        elapsed = time.perf_counter() - start
    finally:
        pool.close()
    failed = [j.result.error for j in done if j.result.failed]
    if failed:
        raise RuntimeError(f"{len(failed)} evaluations failed, e.g. {failed[0]}")
    return {
        "workers": workers,
        "evaluations": len(done),
        "seconds": round(elapsed, 2),
        "evals_per_minute": round(60 * len(done) / elapsed, 1),
        "mean_eval_seconds": round(sum(seconds) / len(seconds), 3),
        # share of the wall time the actors spent evaluating: what the pool's scheduling loses
        "utilisation": round(sum(seconds) / (workers * elapsed), 3),
        "startup_seconds": round(ready, 1),
        "by_worker": {w: sum(1 for j in done if j.worker == w) for w in sorted({j.worker for j in done})},
    }


def _plain_worker(model: str, examples: int, count: int, seed: int, barrier, out) -> None:
    """One process without Ray: build the evaluator, then score `count` candidates."""
    from eep.distributed.pool import build_evaluators

    spec = WorkerSpec(model=model, task=_task(examples), device="cpu", threads=1, splits=("search",))
    evaluator = build_evaluators(spec)["search"]
    generator = torch.Generator().manual_seed(seed)
    num_layers = _num_moe_layers(model)
    evaluator.evaluate(Candidate.random_pruning(num_layers, 8, 4, generator))  # warm-up
    barrier.wait()
    start = time.perf_counter()
    for _ in range(count):
        evaluator.evaluate(Candidate.random_pruning(num_layers, 8, 4, generator))
    out.put(time.perf_counter() - start)


def measure_without_ray(model: str, workers: int, evaluations: int, examples: int) -> dict:
    """The machine's own ceiling: `workers` plain processes scoring side by side, no Ray."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(workers), context.Queue()
    count = evaluations // workers
    procs = [context.Process(target=_plain_worker, args=(model, examples, count, i, barrier, out))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    elapsed = max(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    return {"workers": workers, "evaluations": count * workers, "seconds": round(elapsed, 2),
            "evals_per_minute": round(60 * count * workers / elapsed, 1)}


def _task(examples: int) -> dict:
    return {"name": "add", "source": {"kind": "builtin", "name": "add"},
            "splits": {"search": examples, "dev": 1, "test": 1}}


def _efficiency(runs: list[dict]) -> None:
    base = next((r["evals_per_minute"] for r in runs if r["workers"] == 1), None)
    for r in runs:
        if base:
            r["efficiency"] = round(r["evals_per_minute"] / (r["workers"] * base), 3)


def _num_moe_layers(model: str) -> int:
    from eep.models.families import model_shape
    from eep.models.loading import load_config

    return model_shape(load_config(model)).num_moe_layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--evaluations", type=int, default=40, help="measured evaluations per setting")
    parser.add_argument("--examples", type=int, default=100, help="search-split examples per evaluation")
    parser.add_argument("--model", help="MODEL (default: builtin:tiny-moe or a tiny random Mixtral)")
    parser.add_argument("--without-ray", action="store_true",
                        help="also measure plain processes side by side (the machine's ceiling)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model_dir(Path(tmp))
        load_before = os.getloadavg()
        ceiling = []
        if args.without_ray:
            ceiling = [measure_without_ray(model, w, args.evaluations, args.examples) for w in args.workers]
        ray_runtime.connect(num_cpus=max(args.workers))
        try:
            runs = [measure(model, w, args.evaluations, args.examples) for w in args.workers]
        finally:
            ray_runtime.shutdown()
    _efficiency(runs)
    _efficiency(ceiling)
    print(json.dumps({
        "model": args.model or (model if model.startswith("builtin:") else RANDOM_MODEL),
        "task": f"add, {args.examples} search examples, greedy generation",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
        **({"without_ray": ceiling} if ceiling else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
