"""Export of per-layer budgets: layers keeping different expert counts reload with the same logits.

A stock config has one expert count, so such a checkpoint is an `eep_<family>` one whose config
lists every MoE layer's count (`eep_layer_experts`); eep's class sizes each layer before the
weights load. Uniform candidates stay stock checkpoints.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import eep  # noqa: F401  (registers the eep_<family> classes, as a user's import does)
from eep.candidate import Candidate
from eep.export import export_model, max_logit_difference
from eep.inspect import describe_model
from eep.models.families import moe_layers
from eep.models.loading import load_model
from eep.models.mapped import LAYER_EXPERTS_FIELD
from eep.models.routing import ProbabilityMappedRouter
from eep.models.skipping import CONFIG_FIELD as SKIP_CONFIG_FIELD
from eep.models.skipping import SKIP_KEY, DynamicSkipping
from eep.models.surgery import Surgery
from eep.models.testing import TINY_FAMILIES, tiny_model, tiny_num_experts

TINY = "builtin:tiny-moe"  # Mixtral, 4 MoE layers, 8 experts, top-2
# Layer 0 keeps one expert (fewer than top-2: every token goes to it), layer 2 four.
KEPT = [[3], [1, 5], [0, 2, 4, 7], [6, 7]]
KEEPS = [len(k) for k in KEPT]
TOKENS = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(5))


def merged(base: Candidate, mapping: str = "probs", seed: int = 7) -> Candidate:
    """`base` with every R and M row mixed (non-one-hot): merged experts, a mapped router."""
    g = torch.Generator().manual_seed(seed)

    def noisy(m: torch.Tensor) -> torch.Tensor:
        return (m + 0.1 * torch.rand(m.shape, generator=g)) / 1.1  # positive mixed rows

    return Candidate(
        router_map=[noisy(r) for r in base.router_map],
        expert_merge=[noisy(m) for m in base.expert_merge],
        num_experts=base.num_experts,
        router_mapping=mapping,
        extra=dict(base.extra),
    )


def in_memory(model: str, candidate: Candidate) -> torch.nn.Module:
    """`model` loaded and `candidate` applied in place, as the search evaluates it."""
    net = load_model(model, device="cpu").model.eval()
    thresholds = candidate.extra.get(SKIP_KEY)
    if thresholds is not None:
        # Before the surgery: its top-2 check reads layer 0, which keeps one expert afterwards.
        DynamicSkipping(net, thresholds)
    Surgery(net).apply(candidate)
    return net


def reload(out_dir) -> torch.nn.Module:
    """The exported checkpoint as a user loads it, with no missing, unexpected or resized keys."""
    net, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # Weights memory-mapped from safetensors can sit off a 64-byte boundary, where CPU GEMM
    # kernels round differently (~1e-6 on small batches, seen with skipping); fresh copies make
    # the comparison exact.
    with torch.no_grad():
        for param in net.parameters():
            param.data = param.data.clone()
    return net.eval()


def assert_layer_shapes(net: torch.nn.Module, keeps: list[int], top_k: int) -> None:
    """Every MoE layer holds its own count of experts and routes to min(top_k, k_l) of them."""
    for layer, keep in zip(moe_layers(net), keeps, strict=True):
        experts = layer.experts
        assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == keep
        assert experts.num_experts == layer.gate.num_experts == keep
        assert layer.gate.top_k == min(top_k, keep)
        if hasattr(layer.block, "top_k"):
            assert layer.block.top_k == min(top_k, keep)


def test_pruning_with_per_layer_counts_reloads_the_same_logits(tmp_path):
    cand = Candidate.from_kept(KEPT, 8)
    report = export_model(TINY, cand, tmp_path / "out")
    assert not report.stock and report.keep == KEEPS and report.num_experts == 8

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "eep_mixtral"
    assert config[LAYER_EXPERTS_FIELD] == KEEPS
    assert config["num_local_experts"] == 4  # max k_l: the base class is built that wide
    assert config["num_experts_per_tok"] == 2
    assert "num_router_experts" not in config and SKIP_CONFIG_FIELD not in config  # stock gates

    reloaded = reload(tmp_path / "out")
    assert_layer_shapes(reloaded, KEEPS, top_k=2)
    for layer, keep in zip(moe_layers(reloaded), KEEPS, strict=True):
        assert layer.gate.weight.shape == (keep, reloaded.config.hidden_size)
    # Exactly: the same row gathers and float32 arithmetic, layer by layer.
    assert max_logit_difference(in_memory(TINY, cand), reloaded, TOKENS) == 0.0

    card = (tmp_path / "out" / "README.md").read_text()
    assert "| Experts per MoE layer | 1-4 of 8 (per layer 1,2,4,2; 9 in all) kept, top-2 |" in card
    assert "stock gate rows (`eep_mixtral`, needs `import eep`)" in card
    assert "import eep  # registers" in card


def test_merged_probs_candidate_with_per_layer_counts_reloads_the_same_logits(tmp_path):
    """A router map and per-layer counts together: each layer's mapped router has k_l slots."""
    cand = merged(Candidate.from_kept(KEPT, 8))
    assert not cand.router_has_stock_equivalent()
    report = export_model(TINY, cand, tmp_path / "out")
    assert not report.stock and report.keep == KEEPS

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "eep_mixtral" and config[LAYER_EXPERTS_FIELD] == KEEPS
    assert config["num_router_experts"] == 8 and config["router_mapping"] == "probs"

    reloaded = reload(tmp_path / "out")
    assert_layer_shapes(reloaded, KEEPS, top_k=2)
    for layer, keep in zip(moe_layers(reloaded), KEEPS, strict=True):
        assert isinstance(layer.gate, ProbabilityMappedRouter)
        assert layer.gate.router_map.shape == (keep, 8) and layer.gate.weight.shape[0] == 8
    assert max_logit_difference(in_memory(TINY, cand), reloaded, TOKENS) == 0.0


@pytest.mark.parametrize("kind", ["prune", "merge"])
def test_skipping_with_per_layer_counts_reloads_the_same_logits(tmp_path, kind):
    """NAEE skip thresholds, per-layer counts (and a router map when merged): all three at once."""
    thresholds = [0.9, 0.9, 0.9, 0.9]  # high: most second experts are skipped
    base = Candidate.from_kept(KEPT, 8, extra={SKIP_KEY: thresholds})
    cand = base if kind == "prune" else merged(base)
    want_model = in_memory(TINY, cand)
    with torch.no_grad():
        want = want_model(TOKENS).logits
        plain = in_memory(TINY, Candidate(cand.router_map, cand.expert_merge, 8, router_mapping="probs"))
        assert float((plain(TOKENS).logits - want).abs().max()) > 1e-3  # skipping matters here

    export_model(TINY, cand, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "eep_mixtral"
    assert config[LAYER_EXPERTS_FIELD] == KEEPS and config[SKIP_CONFIG_FIELD] == thresholds
    assert ("num_router_experts" in config) == (kind == "merge")

    reloaded = reload(tmp_path / "out")
    assert_layer_shapes(reloaded, KEEPS, top_k=2)
    hooks = [layer.experts.__dict__.get("forward") for layer in moe_layers(reloaded)]
    assert all(hook is not None for hook in hooks)
    with torch.no_grad():
        got = reloaded(TOKENS).logits
    assert sum(int(h.skipped) for h in hooks) > 0
    assert float((got - want).abs().max()) == 0.0


def test_uniform_candidates_export_as_before(tmp_path):
    """Equal counts in every layer: a stock checkpoint, or eep's class without the new field."""
    report = export_model(TINY, Candidate.from_kept([[0, 2, 4, 7]] * 4, 8), tmp_path / "prune")
    config = json.loads((tmp_path / "prune" / "config.json").read_text())
    assert report.stock and report.keep == 4 and isinstance(report.keep, int)
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert LAYER_EXPERTS_FIELD not in config
    card = (tmp_path / "prune" / "README.md").read_text()
    assert "| Experts per MoE layer | 4 of 8 kept, top-2 |" in card and "import eep" not in card

    report = export_model(TINY, merged(Candidate.from_kept([[0, 2, 4, 7]] * 4, 8)), tmp_path / "merge")
    config = json.loads((tmp_path / "merge" / "config.json").read_text())
    assert not report.stock and report.keep == 4
    assert config["model_type"] == "eep_mixtral" and LAYER_EXPERTS_FIELD not in config


# Per family (3 decoder layers; DeepSeek's first is dense): counts its grouped routing accepts,
# a layer below top-k where the routing allows one.
FAMILY_KEEPS = {
    "mixtral": [1, 3, 5],
    "qwen2_moe": [5, 1, 3],
    "qwen3_moe": [2, 6, 1],
    "olmoe": [3, 1, 7],
    "deepseek_v2": [4, 12],  # multiples of n_group = 4
    "deepseek_v3": [16, 24],  # multiples of n_group = 8, two experts per group at least
}
FAMILY_CASES = [(f, k) for f in TINY_FAMILIES for k in ("prune", "merge")]


@pytest.mark.parametrize(("family", "kind"), FAMILY_CASES)
def test_every_family_reloads_per_layer_counts_with_the_same_logits(tmp_path, family, kind):
    keeps = FAMILY_KEEPS[family]
    num = tiny_num_experts(family)
    g = torch.Generator().manual_seed(11)
    kept = [sorted(torch.randperm(num, generator=g)[:k].tolist()) for k in keeps]
    cand = Candidate.from_kept(kept, num)
    if kind == "merge":  # DeepSeek-V3 has no probability mapping: its merges mix gate rows
        cand = merged(cand, mapping="logits" if family == "deepseek_v3" else "probs")
    source = tmp_path / "source"
    tiny_model(family).save_pretrained(source)

    report = export_model(str(source), cand, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not report.stock and report.keep == keeps
    assert config["model_type"] == f"eep_{family}" and config[LAYER_EXPERTS_FIELD] == keeps
    reloaded = reload(tmp_path / "out")
    top_k = int(tiny_model(family).config.num_experts_per_tok)
    assert_layer_shapes(reloaded, keeps, top_k)
    for layer, keep in zip(moe_layers(reloaded), keeps, strict=True):
        bias = getattr(layer.gate, "e_score_correction_bias", None)
        assert bias is None or bias.shape == (keep,)
    reference = tiny_model(family)
    Surgery(reference).apply(cand)
    # The reload runs transformers' default experts kernel (grouped_mm), the reference the eager
    # one: exact here except DeepSeek-V2 (routed_scaling_factor 16), within 1e-6.
    assert max_logit_difference(reference, reloaded, TOKENS) <= 1e-6


def test_inspect_reads_an_export_with_per_layer_counts(tmp_path):
    """`eep inspect` on the export: per-expert sizes from each layer's own count, not max k_l."""
    export_model(TINY, Candidate.from_kept(KEPT, 8), tmp_path / "out")
    report = describe_model(AutoConfig.from_pretrained(tmp_path / "out"))
    stock = describe_model(load_model(TINY, device="cpu").model.config)
    assert report.gate_up_params_per_expert == stock.gate_up_params_per_expert
    assert report.down_params_per_expert == stock.down_params_per_expert
    assert report.expert_params == stock.params_per_expert * sum(KEEPS)
    text = report.format()
    assert "E = up to 4 per MoE layer" in text and "9 experts over 4 layers" in text


def test_eep_checkpoints_run_the_experts_kernel_stock_ones_run(tmp_path, monkeypatch):
    """Whatever loaded first, an eep_ checkpoint gets the stock default kernel (grouped_mm)."""
    # transformers caches on a class whether it may pick its experts kernel; ours inherited the
    # base's cached answer only once the base had been loaded, and ran eager before.
    from eep.models.mapped import MAPPED_CLASSES

    eep_cls = MAPPED_CLASSES["mixtral"][1]
    base = eep_cls.__mro__[1]
    for cls in (base, eep_cls):  # a fresh process: neither class has been asked yet
        monkeypatch.delattr(cls, "_can_set_experts_implementation_cached_value", raising=False)
    export_model(TINY, Candidate.from_kept(KEPT, 8), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded) is eep_cls
    assert reloaded.config._experts_implementation == "grouped_mm"
