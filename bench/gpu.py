"""Surgery, Evaluator and memory figures of Mixtral-8x7B dimensions on one GPU, random weights.

    python bench/gpu.py                      # one GPU: 8 of 32 decoder layers, bf16
    python bench/gpu.py --layers 16 --examples 256 --batch-size 64
    python bench/gpu.py --tiny               # CPU smoke run (tests/test_bench_gpu.py)

Only shapes matter, so the model is a stock Mixtral with random weights (hidden 4096, intermediate
14336, 8 experts, top-2, 32/8 heads, vocab 32000) and the first `--layers` decoder layers; every
"x32" figure is an extrapolation to Mixtral's 32 layers: per-layer cost times 32.

1. apply: `Surgery.apply` per layer (median after warm-up, synchronized), for a keep-K pure
   pruning (index_select) and a merge with dense random R and M rows (one GEMM per tensor).
2. fitness: the Evaluator's tokens/s (`FitnessResult.tokens / seconds`, surgery included) per
   fitness kind on a synthetic task, for a keep-K pure pruning. Floor = the seconds the same
   tokens need at the bf16 matmul rate measured in this run (8192^3 matmul, CUDA events): 2 x
   active parameters per token (attention + router + top_k experts + lm head; embedding lookup
   and attention scores not counted). measured/floor = how far the Evaluator is from pure GEMM.
   x32 tok/s = tok/s x layers / 32 (embedding and lm head counted as if per layer: pessimistic).
3. memory: `torch.cuda.max_memory_allocated` over the run against `eep inspect`'s Evaluator
   prediction (`describe_model`: originals + working model at keep + a fixed activation
   allowance) for the same layer count; x32 = measured + the predicted weights of the other layers.

Random weights almost never emit EOS, so generation runs to `max_new_tokens`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from eep.builtin.tokenizer import build_tokenizer
from eep.candidate import Candidate
from eep.fitness import Evaluator, surgery_for
from eep.inspect import GIB, EvaluatorMemory, describe_model
from eep.models.loading import LoadedModel, parse_dtype
from eep.models.surgery import Surgery
from eep.tasks.spec import TaskSpec

KINDS = ("accuracy", "likelihood", "kl")
FULL_LAYERS = 32  # Mixtral-8x7B
GPU_PRESET = dict(device="cuda", dtype="bfloat16", layers=8, hidden=4096, intermediate=14336,
                  experts=8, top_k=2, vocab=32000, heads=32, kv_heads=8, examples=128,
                  batch_size=32, repeats=5, matmul=8192)
TINY_PRESET = dict(device="cpu", dtype="float32", layers=2, hidden=64, intermediate=128,
                   experts=8, top_k=2, vocab=128, heads=4, kv_heads=2, examples=8,
                   batch_size=8, repeats=2, matmul=256)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def matmul_rate(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (median of repeats after warm-up)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(max(repeats, 5)):
        if device.type == "cuda":
            # Events time the kernel alone; the host's launch cost is not the GEMM's.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(_timed(lambda: torch.matmul(a, b, out=out), device))
    return 2 * n**3 / statistics.median(times)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A random stock Mixtral of the requested shape, with the built-in character tokenizer."""
    tokenizer = build_tokenizer()
    if args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab {args.vocab} < the tokenizer's {len(tokenizer)} tokens")
    config = MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        # eager experts: what eep.models.loading loads real models with.
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, experts_implementation="eager"
        ).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path="", spec="random Mixtral shape")


def candidates(layers: int, experts: int, keep: int) -> dict[str, Candidate]:
    """A keep-K pure pruning and a merge whose R and M rows are dense (random, rows sum to 1)."""
    g = torch.Generator().manual_seed(0)
    dense = [torch.rand(keep, experts, generator=g) + 0.05 for _ in range(2 * layers)]
    dense = [m / m.sum(dim=1, keepdim=True) for m in dense]
    return {
        "prune": Candidate.random_pruning(layers, experts, keep, generator=0),
        "merge": Candidate(
            router_map=dense[:layers], expert_merge=dense[layers:], num_experts=experts
        ),
    }


def time_apply(surgery: Surgery, cand: Candidate, device: torch.device, repeats: int) -> float:
    """Median wall seconds of one `apply` (all layers), after two warm-up calls."""
    for _ in range(2):
        surgery.apply(cand)
    seconds = statistics.median(_timed(lambda: surgery.apply(cand), device) for _ in range(repeats))
    surgery.restore()
    return seconds


def active_params(config: MixtralConfig) -> int:
    """Parameters one token multiplies through: all but the embedding and the unused experts."""
    report = describe_model(config)
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    idle_experts = report.expert_params * (report.num_experts - report.top_k) // report.num_experts
    return report.total_params - embedding - idle_experts


def time_fitness(loaded: LoadedModel, spec: TaskSpec, kind: str, cand: Candidate,
                 args: argparse.Namespace, device: torch.device) -> dict:
    """Median tokens/s of `evaluate(cand)` for one fitness kind."""
    ev = Evaluator(loaded, spec, "search", batch_size=args.batch_size,
                   max_examples=args.examples, fitness=kind)
    ev.evaluate(cand)  # warm-up: allocator, kernels; the kl reference is built here
    _sync(device)
    results = [ev.evaluate(cand) for _ in range(args.repeats)]
    _sync(device)
    median = sorted(results, key=lambda r: r.tokens / r.seconds)[len(results) // 2]
    return {"kind": kind, "examples": median.count, "tokens": median.tokens,
            "seconds": median.seconds, "tokens_per_s": median.tokens / median.seconds,
            "score": median.score, "metric": median.metric}


def _memory_entry(config: MixtralConfig, keep: int) -> EvaluatorMemory:
    return next(m for m in describe_model(config).evaluator if m.keep == keep)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; dimensions left unset come from the GPU preset or, with --tiny, the tiny one."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny float32 CPU run (the test)")
    for name, value in GPU_PRESET.items():
        kind = str if isinstance(value, str) else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                            help=f"default {value} (tiny: {TINY_PRESET[name]})")
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--task", default="sort", help="a built-in synthetic generate task")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--out", default=None, help="JSON file (default: $OUT/gpu.json when OUT is set)"
    )
    args = parser.parse_args(argv)
    preset = TINY_PRESET if args.tiny else GPU_PRESET
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None and os.environ.get("OUT"):
        args.out = str(Path(os.environ["OUT"]) / "gpu.json")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the three measurements, print markdown tables, write the JSON; return the figures."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU here; try --tiny")
    scale = FULL_LAYERS / args.layers
    out: dict = {"args": vars(args), "torch": torch.__version__,
                 "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}

    rate = matmul_rate(args.matmul, device, dtype, args.repeats)
    out["matmul"] = {"n": args.matmul, "dtype": args.dtype, "flops_per_s": rate}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    loaded = build_model(args, device, dtype)
    # The surgery rewrites the live config's expert count; the figures need the original one.
    config = copy.deepcopy(loaded.model.config)
    surgery = surgery_for(loaded.model)  # the Evaluators below share it

    cands = candidates(args.layers, args.experts, args.keep)
    out["apply"] = {}
    for name, cand in cands.items():
        seconds = time_apply(surgery, cand, device, args.repeats)
        out["apply"][name] = {"seconds": seconds, "per_layer_s": seconds / args.layers,
                              "x32_s": seconds * scale}

    spec = TaskSpec.model_validate({
        "name": args.task, "source": {"kind": "builtin", "name": args.task},
        "splits": {"search": args.examples, "dev": 0, "test": 0},
    })
    active, active_32 = active_params(config), active_params(_with_layers(config, FULL_LAYERS))
    out["active_params"] = {"layers": active, "x32": active_32}
    out["fitness"], peak = [], 0
    for kind in KINDS:
        if cuda:  # a peak per kind: the kl reference or generation's cache may dominate
            peak = max(peak, torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = time_fitness(loaded, spec, kind, cands["prune"], args, device)
        except Exception as exc:  # one failing kind must not cost a GPU run the other figures
            traceback.print_exc()
            row = {"kind": kind, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            peak = max(peak, row["peak_bytes"])
        if "tokens" in row:
            floor_s = 2 * active * row["tokens"] / rate
            row |= {"floor_s": floor_s, "floor_tokens_per_s": row["tokens"] / floor_s,
                    "over_floor": row["seconds"] / floor_s,
                    "x32_tokens_per_s": row["tokens_per_s"] / scale,
                    "x32_floor_tokens_per_s": rate / (2 * active_32)}
        out["fitness"].append(row)

    predicted = _memory_entry(config, args.keep)
    predicted_32 = _memory_entry(_with_layers(config, FULL_LAYERS), args.keep)
    out["memory"] = {"predicted": asdict(predicted), "predicted_x32": asdict(predicted_32)}
    if cuda:
        weights = predicted.originals_bytes + predicted.working_bytes
        weights_32 = predicted_32.originals_bytes + predicted_32.working_bytes
        out["memory"] |= {"peak_bytes": peak, "peak_x32_bytes": peak + weights_32 - weights}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    _print_tables(out, args)
    if args.out:
        print(f"full figures: {args.out}")
    return out


def _with_layers(config: MixtralConfig, layers: int) -> MixtralConfig:
    other = copy.deepcopy(config)
    other.num_hidden_layers = layers
    return other


def _gib(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "n/a"
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _print_tables(out: dict, args: argparse.Namespace) -> None:
    layers, active = args.layers, out["active_params"]
    print(f"\n{out['device_name']}, {args.dtype}, torch {out['torch']}; Mixtral shape "
          f"d={args.hidden} I={args.intermediate} E={args.experts} top-{args.top_k} "
          f"vocab={args.vocab}, {layers} of {FULL_LAYERS} layers; "
          f"x32 = per-layer cost x {FULL_LAYERS}; keep {args.keep}")
    print(f"matmul {args.matmul}^3 {args.dtype}: {out['matmul']['flops_per_s'] / 1e12:.2f} "
          f"TFLOP/s; active params/token {_count(active['layers'])} "
          f"(x32: {_count(active['x32'])})\n")
    print(_row("surgery apply", "ms per layer", f"ms, {layers} layers", "ms x32"))
    print(_row(*["---"] * 4))
    for name, a in out["apply"].items():
        ms = [f"{a[key] * 1e3:.2f}" for key in ("per_layer_s", "seconds", "x32_s")]
        print(_row(name, *ms))
    print()
    print(_row(f"fitness ({args.task}, {args.examples} ex, batch {args.batch_size})", "tokens",
               "s", "tok/s", "floor tok/s", "measured/floor", "tok/s x32", "floor tok/s x32",
               "peak"))
    print(_row(*["---"] * 9))
    for r in out["fitness"]:
        if "tokens" not in r:
            print(_row(r["kind"], f"ERROR: {r['error']}", *[""] * 7))
            continue
        print(_row(r["kind"], r["tokens"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:,.0f}",
                   f"{r['floor_tokens_per_s']:,.0f}", f"{r['over_floor']:.1f}x",
                   f"{r['x32_tokens_per_s']:,.0f}", f"{r['x32_floor_tokens_per_s']:,.0f}",
                   _gib(r.get("peak_bytes"))))
    m = out["memory"]
    p, p32 = m["predicted"], m["predicted_x32"]
    print()
    print(_row(f"memory (keep {args.keep})", f"{layers} layers", "x32"))
    print(_row(*["---"] * 3))
    print(_row("measured peak", _gib(m.get("peak_bytes")), _gib(m.get("peak_x32_bytes"))))
    print(_row("eep inspect need", _gib(p["total_bytes"]), _gib(p32["total_bytes"])))
    print(_row("of which weights (originals + working)",
               *[_gib(q["originals_bytes"] + q["working_bytes"]) for q in (p, p32)]))
    print(_row("of which activation allowance", _gib(p["activation_bytes"]),
               _gib(p32["activation_bytes"])))


if __name__ == "__main__":
    main()
