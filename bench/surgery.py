"""Time `Surgery.apply` per MoE layer against the EEP authors' way (loop + load_state_dict).

    python bench/surgery.py --device cpu --hidden 1024 --intermediate 3584 --layers 2
    python bench/surgery.py --device cuda --dtype bfloat16   # Mixtral-8x7B dimensions

The model has random weights and only the MoE dimensions matter: E experts of
[2I, d] + [d, I] per layer.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from eep.candidate import Candidate
from eep.models.loading import parse_dtype
from eep.models.surgery import Surgery


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _authors_way(model: torch.nn.Module, original_state: dict, cand: Candidate) -> None:
    """Merge on the CPU expert by expert from a state-dict copy, then load_state_dict."""
    state = {}
    for layer, merge in enumerate(cand.expert_merge):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            src = original_state[key]
            out = src.clone()
            for i in range(merge.shape[0]):
                acc = merge[i, 0] * src[0]
                for j in range(1, merge.shape[1]):
                    if merge[i, j] != 0:
                        acc += merge[i, j] * src[j]
                out[i] = acc
            state[key] = out
    model.load_state_dict(state, strict=False)


def main() -> None:
    """Parse arguments, build the model, time both ways, print a markdown row."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-authors", action="store_true")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)

    config = MixtralConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=args.experts,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    base = Candidate.random_pruning(args.layers, args.experts, args.keep, generator=g)
    cand = Candidate(
        router_map=base.router_map,
        expert_merge=[m + 0.05 * torch.randn(m.shape, generator=g) for m in base.expert_merge],
        num_experts=args.experts,
    )
    original_state = None
    if not args.skip_authors:
        original_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    surgery = Surgery(model)
    surgery.apply(cand)  # warm-up: allocates the working tensors
    _sync(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        surgery.apply(cand)
        _sync(device)
        times.append(time.perf_counter() - start)
    ours = min(times) / args.layers
    row = f"| {args.device} {args.dtype} | d={args.hidden} I={args.intermediate} E={args.experts} k={args.keep} | {ours * 1e3:.1f} ms"
    if original_state is not None:
        surgery.restore()
        start = time.perf_counter()
        _authors_way(model, original_state, cand)
        _sync(device)
        theirs = (time.perf_counter() - start) / args.layers
        row += f" | {theirs * 1e3:.0f} ms | {theirs / ours:.0f}x |"
    else:
        row += " | - | - |"
    print("| device, dtype | dims | apply per layer (eep) | authors' way per layer | ratio |")
    print(row)


if __name__ == "__main__":
    main()
