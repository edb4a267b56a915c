"""Candidates/s and tokens/s of the Evaluator against a naive one-example-at-a-time loop.

    python bench/evaluator.py                       # builtin:tiny-moe if trained, else random
    python bench/evaluator.py --experts-impl        # also eager vs grouped_mm experts

Both sides score the same candidates on the same examples in one run and must agree on every
hit. Naive = what one writes first: `model.generate` per example (generation tasks) or one
forward per option (multiple choice), batch 1, no padding. Tokens = prompt + generated tokens
(every prompt+option row for multiple choice), the same count on both sides. Wall time and
process CPU time are both reported: on a CPU shared with other jobs, CPU seconds (one thread)
measure the work and wall seconds also measure the neighbours.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from eep.builtin.tokenizer import build_tokenizer
from eep.builtin.train_tiny import model_config
from eep.candidate import Candidate
from eep.fitness import Evaluator, encode_choice, encode_prompt
from eep.models.loading import BUILTIN_MODELS, LoadedModel, load_model
from eep.tasks.scorers import score_generation, score_multiple_choice


def tiny_moe() -> LoadedModel:
    """The shipped tiny MoE, or a random model of its shape when it is not trained yet."""
    if (BUILTIN_MODELS["tiny-moe"] / "config.json").is_file():
        return load_model("builtin:tiny-moe")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config(tokenizer), dtype=torch.float32, experts_implementation="eager"
    ).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path="", spec="random tiny-moe shape")


@torch.inference_mode()
def naive(ev: Evaluator) -> tuple[list[float], int]:
    """Hits and tokens of the naive loop on whatever the surgery currently holds."""
    tok, model, hits, tokens = ev.tokenizer, ev.model, [], 0
    for ex in ev.examples:
        if ev.multiple_choice:
            logliks = []
            for option in ex.options:
                context, cont = encode_choice(tok, ex.prompt, option)
                ids = torch.tensor([context + cont])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                at = torch.arange(len(context) - 1, len(context) - 1 + len(cont))
                logliks.append(logprobs[at, torch.tensor(cont)].double().sum().item())
                tokens += ids.shape[1]
            hits.append(score_multiple_choice(ev.spec, ex, logliks)[ev.metric])
        else:
            ids = torch.tensor([encode_prompt(tok, ex.prompt)])
            new = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=ev.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :].tolist()
            tokens += ids.shape[1] + len(new)
            new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            text = tok.decode(new, skip_special_tokens=True)
            hits.append(score_generation(ev.spec, ex, text)[ev.metric])
    return hits, tokens


def run_task(loaded: LoadedModel, task: str, args: argparse.Namespace) -> dict:
    """Evaluator vs naive on one task: candidates/s, tokens/s, agreement."""
    ev = Evaluator(loaded, task, batch_size=args.batch_size, max_examples=args.examples)
    cands: list[Candidate | None] = [None] + [
        Candidate.random_pruning(ev.num_layers, ev.num_experts, keep=args.keep, generator=i)
        for i in range(args.candidates - 1)
    ]
    ev.evaluate(None)  # warm-up (first-call allocations), not timed
    fast_s = fast_cpu = fast_tokens = 0.0
    slow_s = slow_cpu = slow_tokens = 0.0
    agree, scores = True, []
    for cand in cands:  # interleaved, so load changes hit both sides alike
        cpu = time.process_time()
        result = ev.evaluate(cand)
        fast_cpu += time.process_time() - cpu
        fast_s += result.seconds
        fast_tokens += result.tokens
        start, cpu = time.perf_counter(), time.process_time()
        hits, tokens = naive(ev)  # the surgery still holds `cand`
        slow_s += time.perf_counter() - start
        slow_cpu += time.process_time() - cpu
        slow_tokens += tokens
        agree &= hits == result.hits
        scores.append(result.score)
    n = len(cands)
    return {
        "task": task,
        "examples": len(ev.examples),
        "candidates": n,
        "fast_cps": n / fast_s,
        "slow_cps": n / slow_s,
        "fast_tps": fast_tokens / fast_s,
        "slow_tps": slow_tokens / slow_s,
        "cpu_speedup": slow_cpu / fast_cpu,
        "agree": agree,
        "mean_score": sum(scores) / n,
    }


def experts_impl(loaded: LoadedModel, task: str, args: argparse.Namespace) -> list[dict]:
    """The Evaluator with eager vs grouped_mm experts: seconds per candidate, same hits?"""
    ev = Evaluator(loaded, task, batch_size=args.batch_size, max_examples=args.examples)
    cands = [None] + [
        Candidate.random_pruning(ev.num_layers, ev.num_experts, keep=args.keep, generator=i)
        for i in range(args.candidates - 1)
    ]
    rows, reference = [], None
    for impl in ("eager", "grouped_mm") * args.repeats:  # alternating: load drifts
        loaded.model.set_experts_implementation(impl)
        ev.evaluate(None)
        seconds, cpu_seconds, hits, outputs = 0.0, 0.0, [], []
        for cand in cands:
            cpu = time.process_time()
            result = ev.evaluate(cand)
            cpu_seconds += time.process_time() - cpu
            seconds += result.seconds
            hits.append(result.hits)
            outputs.append(ev.last_outputs)
        reference = reference or (hits, outputs)
        rows.append(
            {
                "impl": impl,
                "task": task,
                "s_per_candidate": seconds / len(cands),
                "cpu_s_per_candidate": cpu_seconds / len(cands),
                "same_hits": hits == reference[0],
                "same_outputs": outputs == reference[1],
            }
        )
    loaded.model.set_experts_implementation("eager")
    return rows


def main() -> None:
    """Parse arguments, run both sides per task, print markdown rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["add", "reverse", "compare"])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument(
        "--candidates", type=int, default=3, help="the full model + random prunings"
    )
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts-impl", action="store_true", help="also eager vs grouped_mm")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of eager/grouped_mm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = tiny_moe()
    print(
        f"model: {loaded.spec}; {args.examples} examples, {args.candidates} candidates, "
        f"batch {args.batch_size}, {args.threads} threads"
    )
    print(
        "| task | examples | Evaluator cand/s | naive cand/s | speed-up (wall) | speed-up (CPU) "
        "| Evaluator tok/s | naive tok/s | hits agree | mean score |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        r = run_task(loaded, task, args)
        print(
            f"| {r['task']} | {r['examples']} | {r['fast_cps']:.2f} | {r['slow_cps']:.3f} | "
            f"{r['fast_cps'] / r['slow_cps']:.1f}x | {r['cpu_speedup']:.1f}x | "
            f"{r['fast_tps']:,.0f} | {r['slow_tps']:,.0f} "
            f"| {'yes' if r['agree'] else 'NO'} | {r['mean_score']:.3f} |",
            flush=True,
        )
    if args.experts_impl:
        print(
            "\n| experts | task | wall s per candidate | CPU s per candidate "
            "| same hits as eager | same outputs |"
        )
        print("|---|---|---|---|---|---|")
        for task in args.tasks:
            for r in experts_impl(loaded, task, args):
                print(
                    f"| {r['impl']} | {r['task']} | {r['s_per_candidate']:.3f} | "
                    f"{r['cpu_s_per_candidate']:.3f} | "
                    f"{'yes' if r['same_hits'] else 'NO'} | "
                    f"{'yes' if r['same_outputs'] else 'NO'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
