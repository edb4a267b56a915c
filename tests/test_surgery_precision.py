"""Surgery beyond float32 on one device: bf16 exactness, originals kept on the host, device_map loading."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from eep.candidate import Candidate
from eep.distributed.pool import WorkerSpec, build_evaluators
from eep.fitness import Evaluator
from eep.models.families import moe_layers
from eep.models.loading import load_model
from eep.models.surgery import Surgery
from eep.models.testing import (
    TINY_FAMILIES,
    save_tiny_model,
    tiny_config,
    tiny_keep,
    tiny_model,
    tiny_num_experts,
)

TOKENS = torch.tensor([[5, 17, 3, 42, 8, 91, 23, 4, 60, 11, 7, 33], [9, 2, 88, 14, 5, 5, 71, 30, 3, 19, 45, 6]])
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def kept_experts(family: str, num_layers: int, seed: int = 0) -> list[list[int]]:
    """Half of each layer's experts in an unsorted slot order (slots are kept in the order given)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(tiny_num_experts(family), generator=g)[: tiny_keep(family)].tolist() for _ in range(num_layers)]


def pruning(family: str, num_layers: int) -> Candidate:
    return Candidate.from_kept(kept_experts(family, num_layers), tiny_num_experts(family))


def merge_candidate(family: str, num_layers: int, mapping: str, seed: int) -> Candidate:
    """Near-one-hot M and R, like a merging-phase candidate (R not one-hot: the mapped router)."""
    g = torch.Generator().manual_seed(seed)
    experts, keep = tiny_num_experts(family), tiny_keep(family)
    maps = []
    for kept in kept_experts(family, num_layers, seed):
        m = 0.05 * torch.randn(keep, experts, generator=g)
        m[torch.arange(keep), torch.tensor(kept)] += 1.0
        maps.append(m)
    return Candidate(
        router_map=[m + 0.01 for m in maps], expert_merge=maps, num_experts=experts, router_mapping=mapping
    )


# ----------------------------------------------------------------------------- bf16 pure pruning
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bf16_pure_pruning_is_the_model_built_from_the_kept_experts(family):
    """Surgery in bf16 equals, bit for bit, a fresh model of KEEP experts loaded with the sliced weights."""
    def bf16_model(num_experts: int) -> torch.nn.Module:
        # Built in bf16 as from_pretrained does; `.to(bf16)` would also round the float32 rotary
        # buffers, and the two models must differ in their experts only.
        return AutoModelForCausalLM.from_config(
            tiny_config(family, num_experts=num_experts), dtype=torch.bfloat16, experts_implementation="eager"
        ).eval()

    full = bf16_model(tiny_num_experts(family))
    full.load_state_dict(tiny_model(family).state_dict())
    num_moe = len(moe_layers(full))
    kept = kept_experts(family, num_moe)
    state = full.state_dict()

    pruned = bf16_model(tiny_keep(family))
    # Every tensor whose shape changed has the experts on dim 0 (expert weights, gate rows, the
    # DeepSeek-V3 score bias); slice it by that MoE layer's kept experts, in slot order.
    moe_index = {}
    sliced = {}
    for name, tensor in pruned.state_dict().items():
        if tensor.shape == state[name].shape:
            sliced[name] = state[name]
            continue
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        moe_index.setdefault(layer, len(moe_index))
        sliced[name] = state[name][kept[moe_index[layer]]]
    assert len(moe_index) == num_moe
    pruned.load_state_dict(sliced, strict=True)
    want = logits(pruned)

    surgery = Surgery(full)
    surgery.apply(Candidate.from_kept(kept, tiny_num_experts(family)))
    got = logits(full)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- originals on the host
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_originals_on_cpu_compute_what_the_default_computes(family, dtype):
    default_model = tiny_model(family).to(dtype)
    streamed_model = tiny_model(family).to(dtype)
    full = logits(default_model)
    num_moe = len(moe_layers(default_model))
    default, streamed = Surgery(default_model), Surgery(streamed_model, originals_device="cpu")
    candidates = [pruning(family, num_moe), merge_candidate(family, num_moe, "logits", 1)]
    if family != "deepseek_v3":  # the probability mapping is refused for sigmoid routers
        candidates.append(merge_candidate(family, num_moe, "probs", 2))
    for candidate in candidates:  # in sequence: each result from the originals, not the last one
        default.apply(candidate)
        streamed.apply(candidate)
        want = logits(default_model)
        assert torch.equal(logits(streamed_model), want), candidate.router_mapping
        assert not torch.equal(want, full)
    streamed.restore()
    assert torch.equal(logits(streamed_model), full)
    assert all(p.dtype == dtype for p in streamed_model.parameters())


# ----------------------------------------------------------------------------- device_map loading
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2-MoE (shared expert) with the character tokenizer, saved as a folder."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "qwen2_moe")


TASK = {
    "name": "compare",
    "source": {"kind": "builtin", "name": "compare"},
    "scorer": "multiple_choice",
    "splits": {"search": 8, "dev": 0, "test": 0, "seed": 0},
}


def test_worker_device_map_reaches_the_loader(model_dir):
    """`WorkerSpec.device_map` (a Ray actor given several GPUs) is what the model is loaded with."""
    # device "meta" would leave no weights: with a device_map the map alone places the model.
    spec = WorkerSpec(model=model_dir, task=TASK, device="meta", device_map="cpu")
    if not HAS_ACCELERATE:
        # transformers needs accelerate for any device_map (the Docker image installs it): the
        # refusal proves the map was passed on.
        with pytest.raises(ValueError, match="accelerate"):
            build_evaluators(spec)
        return
    evaluator = build_evaluators(spec)["search"]
    assert evaluator.evaluate(None).error is None


@pytest.mark.skipif(not HAS_ACCELERATE, reason="device_map needs accelerate (in the Docker image, not in .[dev])")
@pytest.mark.parametrize(
    "device_map",
    ["cpu", {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}],
    ids=["cpu", "per-module"],
)
def test_device_map_model_evaluates_like_the_default(model_dir, device_map):
    # device "meta" would leave no weights: a device_map places the model and `device` is not
    # applied on top (a .to() would collapse a model spread over several GPUs onto one).
    mapped = load_model(model_dir, device="meta", dtype="bfloat16", device_map=device_map)
    plain = load_model(model_dir, device="cpu", dtype="bfloat16")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    assert {p.dtype for p in mapped.model.parameters()} == {torch.bfloat16}
    assert mapped.model.config._experts_implementation == "eager"
    a, b = Evaluator(mapped, TASK), Evaluator(plain, TASK)
    num_moe = a.num_layers
    for candidate in (None, pruning("qwen2_moe", num_moe), merge_candidate("qwen2_moe", num_moe, "probs", 3)):
        ra, rb = a.evaluate(candidate), b.evaluate(candidate)
        assert ra.error is None and (ra.score, ra.hits) == (rb.score, rb.hits)
        assert a.last_outputs == b.last_outputs
