"""Train the built-in tiny Mixtral MoE on the synthetic task suite (CPU, 20-30 minutes on 2 cores).

    python -m eep.builtin.train_tiny --out eep/builtin/tiny-moe --steps 4500 --seed 1 --tied-steps 2000

(the defaults; the shipped model). The same seed, step count and thread count give the same
weights (with one torch build). The model is upcycled, as Mixtral's experts are believed to be:
for the first 2,000 steps every layer's experts are kept equal (one dense FFN), then they train
apart. Its experts overlap in function, so pruning half of them costs points instead of most of the
accuracy, and merging two of them mixes related weights (docs/benchmarks.md, "The built-in tiny
model": the earlier recipe without tying left experts so specialised that a random 4-of-8
pruning kept 0.27 of 0.98 mean accuracy).

The shape and architecture are options (stock Mixtral, Qwen3-MoE or OLMoE classes); training.json
records them ("arch", "shape") with the rest of the recipe. The other built-in models:

    python -m eep.builtin.train_tiny --arch mixtral --layers 16 --hidden 128 --intermediate 128 \
        --experts 8 --top-k 2 --heads 4 --steps 4000 --tied-steps 1000 --lr 1.5e-3 --seed 1 \
        --out eep/builtin/deep-moe

    python -m eep.builtin.train_tiny --arch qwen3_moe --layers 8 --hidden 128 --intermediate 32 \
        --experts 64 --top-k 8 --heads 4 --steps 4000 --tied-steps 1500 --seed 1 \
        --experts-impl grouped_mm --out eep/builtin/fine-moe

At the 4-layer model's peak learning rate (3e-3) the 16-layer one learned far more slowly (after
2,000 steps, train accuracy add 0.23, reverse 0.11); at 1.5e-3 it reached add 0.43, reverse 0.88
after 1,250.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Literal

# OpenMP threads that spin while waiting made a training step ~15x slower when other processes
# share the 2 cores (84 s vs 5.7 s for 10 steps, measured); sleeping waiters cost little when the
# machine is quiet. Read once when torch loads, so it has to be set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, model_validator  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GenerationConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
)

from eep.builtin.tokenizer import build_tokenizer  # noqa: E402
from eep.tasks.example import Example  # noqa: E402
from eep.tasks.synthetic import SYNTHETIC_TASKS, make_examples  # noqa: E402

# Base share of each batch per task: the tasks that need more than a copy/shift (carry,
# counting, matching a key) get more of it. During training each share is further scaled by the
# task's current error rate on training examples, so learned tasks stop taking the budget.
TASK_WEIGHTS: dict[str, float] = {
    "add": 2.0,
    "reverse": 1.0,
    "sort": 1.5,
    "caesar": 1.5,
    "count": 2.0,
    "lookup": 3.0,
    "compare": 1.0,
}
TRAIN_POOL = 30_000  # distinct training examples per task (fewer where the task has fewer)
# Tasks with small prompt spaces: most of their train split (add 8,028 prompts, compare 6,431,
# lookup 8,936, count ~13,100).
TRAIN_POOL_SMALL = {"add": 7_500, "compare": 6_000, "lookup": 8_500, "count": 12_000}
EVAL_EXAMPLES = 200
REWEIGHT_EVERY = 250
REWEIGHT_EXAMPLES = 200
# Added to every task's weight: learned tasks keep a share (so they stay learned), and near the end,
# when all errors are small, the shares follow the errors instead of the base weights (a run that
# scaled the floor by the base weight ended with caesar at 0.915, starved by learned lookup).
WEIGHT_FLOOR = 0.1


ARCHS = ("mixtral", "qwen3_moe", "olmoe")


class ModelShape(BaseModel):
    """Architecture and size of a built-in model; the defaults are the shipped tiny-moe."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["mixtral", "qwen3_moe", "olmoe"] = "mixtral"
    layers: int = Field(4, ge=1)
    hidden: int = Field(128, ge=8)
    intermediate: int = Field(256, ge=1, description="width of one expert's FFN")
    experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> ModelShape:
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} > experts {self.experts}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        return self


def model_config(
    tokenizer: PreTrainedTokenizerFast, shape: ModelShape | None = None
) -> PretrainedConfig:
    """The stock config of `shape.arch` for `shape` (default: tiny Mixtral, 4 layers, 8x256, top-2)."""
    shape = shape or ModelShape()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        num_experts_per_tok=shape.top_k,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        # Mixtral's default theta (1e6) barely rotates most channels within 30 positions; the
        # tasks need exact positions (reverse, shift, lookup), so use the classic 1e4.
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        router_aux_loss_coef=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if shape.arch == "mixtral":
        return MixtralConfig(
            intermediate_size=shape.intermediate, num_local_experts=shape.experts, **common
        )
    if shape.arch == "qwen3_moe":
        # Every layer sparse, no dense MLP layers, top-k weights renormalised, as in Qwen3-MoE.
        # Qwen3's head_dim defaults to 128 regardless of hidden size; tie it to hidden/heads.
        return Qwen3MoeConfig(
            intermediate_size=shape.intermediate,  # dense MLP width: unused with no dense layers
            moe_intermediate_size=shape.intermediate,
            num_experts=shape.experts,
            head_dim=shape.hidden // shape.heads,
            norm_topk_prob=True,
            mlp_only_layers=[],
            decoder_sparse_step=1,
            **common,
        )
    return OlmoeConfig(
        intermediate_size=shape.intermediate, num_experts=shape.experts, **common
    )


def encode(
    tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """Per (prompt, continuation): ids of `<s> prompt continuation </s>`, continuation start."""
    # Batched calls: the per-call Python overhead of the tokenizer dominates for short strings.
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    rests = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + r + [eos], len(p)) for p, r in zip(prompts, rests, strict=True)]


def collate(
    rows: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside continuation + EOS)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
        labels[r, start : len(ids)] = torch.tensor(ids[start:])
    return input_ids, attention_mask, labels


@torch.no_grad()
def continuation_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    pairs: list[tuple[str, str]],
    batch_size: int = 256,
) -> list[tuple[bool, float]]:
    """Per (prompt, continuation): argmax matches every continuation+EOS token; its log-likelihood.

    The log-likelihood sums the continuation's own tokens (EOS excluded), the usual option score.
    """
    results: list[tuple[bool, float]] = []
    for b in range(0, len(pairs), batch_size):
        rows = encode(tokenizer, pairs[b : b + batch_size])
        input_ids, attention_mask, labels = collate(rows, tokenizer.pad_token_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # [batch, seq-1, vocab]
        targets = labels[:, 1:]  # [batch, seq-1]
        mask = targets != -100
        hit = (logprobs.argmax(-1) == targets) | ~mask
        token_lp = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for r, (ids, _) in enumerate(rows):
            eos_pos = len(ids) - 2  # position predicting the EOS in the shifted frame
            lp = (token_lp[r] * mask[r])[:eos_pos].sum()
            results.append((bool(hit[r].all()), float(lp)))
    return results


def accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, examples: list[Example]
) -> float:
    """Exact match (teacher-forced argmax) for generation; highest-likelihood option for MC."""
    if not examples:
        return 0.0
    if examples[0].is_multiple_choice:
        pairs = [(ex.prompt, opt) for ex in examples for opt in ex.options]
        scores = continuation_scores(model, tokenizer, pairs)
        correct, i = 0, 0
        for ex in examples:
            lls = [lp for _, lp in scores[i : i + len(ex.options)]]
            i += len(ex.options)
            correct += int(max(range(len(lls)), key=lls.__getitem__) == ex.label)
        return correct / len(examples)
    scores = continuation_scores(model, tokenizer, [(ex.prompt, ex.answers[0]) for ex in examples])
    return sum(hit for hit, _ in scores) / len(examples)


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    split: str,
    n: int = EVAL_EXAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy per synthetic task on `n` examples of `split`."""
    was_training = model.training
    model.eval()
    result = {
        name: accuracy(model, tokenizer, make_examples(name, split, n, seed=seed))
        for name in SYNTHETIC_TASKS
    }
    model.train(was_training)
    return result


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    out: Path,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 200,
    eval_every: int = 500,
    threads: int = 1,
    tied_steps: int = 2000,
    shape: ModelShape | None = None,
    experts_implementation: str = "eager",
) -> dict:
    """Train, save to `out` in bfloat16, reload as saved and report per-task test accuracy.

    `tied_steps` > 0 upcycles: for that many steps every layer's experts are kept equal (their
    mean after each update), i.e. one dense FFN; then they train apart. Experts that share an
    origin overlap in function and merge meaningfully, as Mixtral's are believed to.
    `experts_implementation` is used for training only; the test accuracy is measured with
    eager experts, as eep loads models.
    """
    shape = shape or ModelShape()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()

    pools: dict[str, list[tuple[list[int], int]]] = {}
    for name in SYNTHETIC_TASKS:
        n = TRAIN_POOL_SMALL.get(name, TRAIN_POOL)
        # MC examples are trained on the correct option, which `answers` holds.
        examples = make_examples(name, "train", n, seed=seed)
        pools[name] = encode(tokenizer, [(ex.prompt, ex.answers[0]) for ex in examples])
    names = list(SYNTHETIC_TASKS)
    weights = [TASK_WEIGHTS[name] for name in names]
    probe = {name: make_examples(name, "train", REWEIGHT_EXAMPLES, seed=seed) for name in names}

    model = AutoModelForCausalLM.from_config(model_config(tokenizer, shape))
    model.set_experts_implementation(experts_implementation)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "gate.weight" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        fused=True,  # one kernel over all tensors instead of a Python loop (CPU supports it)
    )

    # Fused expert tensors [E, ...] of every layer (transformers 5.x layout).
    expert_tensors = [p for n, p in model.named_parameters() if ".experts." in n]
    if tied_steps and not expert_tensors:
        raise RuntimeError("no fused expert tensors found to tie")
    if tied_steps:
        with torch.no_grad():  # start from one expert's init (a mean of 8 would shrink its scale)
            for tensor in expert_tensors:
                tensor.copy_(tensor[:1].expand_as(tensor))
    start = time.time()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        tasks = rng.choices(names, weights=weights, k=batch_size)
        rows = [rng.choice(pools[name]) for name in tasks]
        input_ids, attention_mask, labels = collate(rows, tokenizer.pad_token_id)
        loss = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            output_router_logits=True,
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step < tied_steps:
            with torch.no_grad():
                for tensor in expert_tensors:
                    tensor.copy_(tensor.mean(dim=0, keepdim=True).expand_as(tensor))
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
        if (step + 1) % REWEIGHT_EVERY == 0 and step + 1 < steps:
            model.eval()
            acc = {name: accuracy(model, tokenizer, probe[name]) for name in names}
            model.train()
            weights = [TASK_WEIGHTS[n] * (1.0 - acc[n]) + WEIGHT_FLOOR for n in names]
            print(f"step {step + 1} train " + _fmt(acc), flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            acc = evaluate_tasks(model, tokenizer, "search", n=100)
            print(f"step {step + 1} search " + _fmt(acc), flush=True)
    train_seconds = time.time() - start

    out.mkdir(parents=True, exist_ok=True)
    # bfloat16 halves the folder (3.4M params: 6.8 MB instead of 13.7 MB); accuracy below is
    # measured on these rounded weights.
    model.to(torch.bfloat16).save_pretrained(out)
    # Stored in bfloat16, computed in float32: a plain from_pretrained then gives float32 (bf16
    # matmuls on a CPU are slow), and float32 holds every bfloat16 value exactly.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    ).save_pretrained(out)

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    saved.set_experts_implementation("eager")
    test = evaluate_tasks(saved, tokenizer, "test", n=EVAL_EXAMPLES)
    record = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "peak_lr": lr,
        "warmup_steps": warmup,
        "threads": threads,
        "tied_steps": tied_steps,
        "arch": shape.arch,
        "shape": shape.model_dump(exclude={"arch"}),
        "experts_implementation": experts_implementation,
        "torch": torch.__version__,
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in saved.parameters()),
        "test_examples_per_task": EVAL_EXAMPLES,
        "test_accuracy": test,
        "test_accuracy_mean": round(sum(test.values()) / len(test), 4),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print("test (as saved, float32) " + _fmt(test), flush=True)
    print(f"trained {steps} steps in {train_seconds:.0f}s; saved to {out}", flush=True)
    return record


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("eep/builtin/tiny-moe"))
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--seed", type=int, default=1, help="1 gives the shipped model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    # One thread: this model's many small ops wait at a barrier per op with two, which costs more
    # than it gains whenever anything else runs on the 2 cores. Results depend on the count.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tied-steps", type=int, default=2000,
        help="first N steps with every layer's experts kept equal (upcycling from one dense FFN)",
    )
    parser.add_argument("--arch", choices=ARCHS, default="mixtral")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256, help="one expert's FFN width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--experts-impl", default="eager", choices=("eager", "grouped_mm", "batched_mm"),
        help="expert kernels for training only (the saved model is the stock class either way)",
    )
    args = parser.parse_args(argv)
    shape = ModelShape(**{name: getattr(args, name) for name in ModelShape.model_fields})
    train(
        args.out,
        args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        threads=args.threads,
        tied_steps=args.tied_steps,
        shape=shape,
        experts_implementation=args.experts_impl,
    )


if __name__ == "__main__":
    main()
