"""Surgery against independent computations written here, for every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eep.candidate import Candidate, CandidateError
from eep.models.families import moe_layers
from eep.models.surgery import Surgery
from eep.models.testing import TINY_FAMILIES, tiny_keep, tiny_model

TOKENS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
SOFTMAX_FAMILIES = [f for f in TINY_FAMILIES if f != "deepseek_v3"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def merged_candidate(surgery: Surgery, keep: int, mapping: str = "probs", seed: int = 0) -> Candidate:
    """Near-one-hot R and M with noise, as EEP's merging phase produces."""
    g = torch.Generator().manual_seed(seed)
    base = Candidate.random_pruning(surgery.num_layers, surgery.num_experts, keep, generator=g)
    noise = lambda m: m + 0.1 * torch.randn(m.shape, generator=g)  # noqa: E731
    return Candidate(
        router_map=[noise(m) for m in base.router_map],
        expert_merge=[noise(m) for m in base.expert_merge],
        num_experts=surgery.num_experts,
        router_mapping=mapping,
    )


def test_merged_weights_equal_loop_over_experts(family):
    model = tiny_model(family)
    originals = [
        (layer.experts.gate_up_proj.detach().clone(), layer.experts.down_proj.detach().clone(), layer.gate.weight.detach().clone())
        for layer in moe_layers(model)
    ]
    surgery = Surgery(model)
    keep, num = tiny_keep(family), surgery.num_experts
    cand = merged_candidate(surgery, keep=keep, mapping="logits")
    surgery.apply(cand)
    for layer, (gate_up, down, gate), m, r in zip(
        surgery.layers, originals, cand.expert_merge, cand.router_map, strict=True
    ):
        assert layer.experts.gate_up_proj.shape[0] == keep  # really holds keep experts
        assert layer.experts.down_proj.shape[0] == keep
        for i in range(keep):
            want_gu = sum(m[i, j] * gate_up[j] for j in range(num))
            want_down = sum(m[i, j] * down[j] for j in range(num))
            torch.testing.assert_close(layer.experts.gate_up_proj[i], want_gu, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.experts.down_proj[i], want_down, rtol=1e-5, atol=1e-6)
            want_gate = sum(r[i, j] * gate[j] for j in range(num))
            torch.testing.assert_close(layer.gate.weight[i], want_gate, rtol=1e-5, atol=1e-6)


# Top-k renormalisation per family, as transformers' routers do it (DeepSeek-V2 never does).
RENORMALIZES = {
    "mixtral": lambda c: True,
    "qwen2_moe": lambda c: c.norm_topk_prob,
    "qwen3_moe": lambda c: c.norm_topk_prob,
    "olmoe": lambda c: c.norm_topk_prob,
    "deepseek_v2": lambda c: False,
    "deepseek_v3": lambda c: c.norm_topk_prob,
}


def _naive_slot_routing(family, config, gate, bias, x, R, mode, top_k):
    """One token's (weights, slots), written out from the papers' and configs' definitions.

    probs: p = softmax(G x) over all experts, s = R p (divided by its sum when the family does not
    renormalise). logits: the stock router over the gate rows R G (and bias R b). Then the
    family's selection on the k slots, in groups of consecutive slots for DeepSeek.
    """
    renormalize = RENORMALIZES[family](config)
    sigmoid = family == "deepseek_v3"
    if mode == "probs":
        s = R @ torch.softmax((gate @ x).float(), dim=0)
        if not renormalize:
            s = s / s.sum()
        choice = s
    else:
        logits = (R @ gate) @ x
        s = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=0)
        choice = s + R @ bias if bias is not None else s
    method = "noaux_tc" if sigmoid else getattr(config, "topk_method", "greedy")
    if method != "greedy":
        groups = choice.reshape(config.n_group, -1)
        if method == "noaux_tc":
            group_score = groups.topk(2).values.sum(dim=1)
        else:
            group_score = groups.max(dim=1).values
        best = set(group_score.topk(config.topk_group).indices.tolist())
        per_group = groups.shape[1]
        outside = torch.tensor([slot // per_group not in best for slot in range(choice.numel())])
        choice = choice.masked_fill(outside, 0.0 if method == "group_limited_greedy" else float("-inf"))
        if method == "group_limited_greedy":
            s = choice
    slots = torch.topk(choice, top_k).indices
    w = s[slots]
    if renormalize:
        w = w / w.sum()
    return w * getattr(config, "routed_scaling_factor", 1.0), slots


def _naive_block(family, config, originals, x, R, M, top_k, mode="probs", shared=None):
    """The merged block, one token and one slot at a time."""
    gate_up, down, gate, bias = originals
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, idx = _naive_slot_routing(family, config, gate, bias, x[t], R, mode, top_k)
        for weight, slot in zip(w.tolist(), idx.tolist(), strict=True):
            gu = sum(M[slot, j] * gate_up[j] for j in range(gate_up.shape[0]))
            dn = sum(M[slot, j] * down[j] for j in range(down.shape[0]))
            g, u = (gu @ x[t]).chunk(2)
            out[t] += weight * (dn @ (F.silu(g) * u))
    if shared is not None:
        out = out + shared(x)
    return out


def _shared_output(family, block):
    if family == "qwen2_moe":
        return lambda x: torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if family.startswith("deepseek"):
        return block.shared_experts
    return None


@pytest.mark.parametrize(
    ("family", "mode"), [(f, "probs") for f in SOFTMAX_FAMILIES] + [(f, "logits") for f in TINY_FAMILIES]
)
def test_merged_block_matches_naive_block(family, mode):
    """Mixed R and M against the definitions: DeepSeek-V2 with routed_scaling_factor 16 and
    group-limited top-k, DeepSeek-V3 with 2.5, n_group 8 and a non-zero correction bias."""
    model = tiny_model(family)
    layer = moe_layers(model)[1]
    bias = getattr(layer.gate, "e_score_correction_bias", None)
    originals = (
        layer.experts.gate_up_proj.detach().clone(),
        layer.experts.down_proj.detach().clone(),
        layer.gate.weight.detach().clone(),
        None if bias is None else bias.detach().clone(),
    )
    surgery = Surgery(model)
    cand = merged_candidate(surgery, keep=tiny_keep(family), mapping=mode, seed=3)
    surgery.apply(cand)
    x = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer.block(x[None])[0]
        want = _naive_block(
            family, model.config, originals, x, cand.router_map[1], cand.expert_merge[1],
            model.config.num_experts_per_tok, mode,
            _shared_output(family, layer.block),
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _capture_routing(model):
    """Record the expert indices every MoE layer's experts module receives."""
    seen: list[torch.Tensor] = []
    for layer in moe_layers(model):
        layer.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    return seen


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
@pytest.mark.parametrize("mapping", ["probs", "logits"])
def test_pruning_equals_masking_dropped_router_logits(family, mapping, monkeypatch):
    """Pruning == the full model with the dropped experts' router logits at -inf.

    Routing decisions are compared exactly; logits to float32 rounding, because a softmax over
    4 values and one over 8 values with 4 at -inf sum in a different order (~3e-6 here).
    """
    kept = [[1, 3, 4, 6], [0, 2, 5, 7], [2, 3, 4, 5]]
    # Group-limited top-k groups the pruned router's slots, not the original experts, so the
    # equivalence holds for greedy top-k only (DeepSeek-V2 keeps its scaling factor 16 here).
    overrides = {"topk_method": "greedy"} if family == "deepseek_v2" else {}
    reference = tiny_model(family, **overrides)
    gates = {layer.gate.weight.data_ptr(): i for i, layer in enumerate(moe_layers(reference))}
    original_linear = F.linear

    def masked_linear(x, w, b=None):
        out = original_linear(x, w, b)
        if w.data_ptr() in gates:
            drop = torch.ones(out.shape[-1], dtype=torch.bool)
            drop[kept[gates[w.data_ptr()]]] = False
            out = out.masked_fill(drop, float("-inf"))
        return out

    want_routes = _capture_routing(reference)
    monkeypatch.setattr(torch.nn.functional, "linear", masked_linear)
    want = logits(reference)
    monkeypatch.setattr(torch.nn.functional, "linear", original_linear)

    model = tiny_model(family, **overrides)
    surgery = Surgery(model)
    cand = Candidate.from_kept(kept[: surgery.num_layers], surgery.num_experts)
    cand = cand.with_meta(router_mapping=mapping)
    surgery.apply(cand)
    got_routes = _capture_routing(model)
    got = logits(model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(got_routes) == len(want_routes) == surgery.num_layers
    for layer_kept, slots, experts in zip(kept, got_routes, want_routes, strict=False):
        as_original = torch.tensor(layer_kept)[slots]
        assert torch.equal(as_original.sort(dim=-1).values, experts.sort(dim=-1).values)


@pytest.mark.parametrize("mapping", ["probs", "logits"])
def test_apply_b_after_a_equals_fresh_b_and_restore(family, mapping):
    model = tiny_model(family)
    original = logits(model)
    surgery = Surgery(model)
    keep = tiny_keep(family)
    a = merged_candidate(surgery, keep=keep, mapping="logits", seed=1)
    b = merged_candidate(surgery, keep=keep, mapping=mapping, seed=2)
    if family == "deepseek_v3" and mapping == "probs":
        b = b.with_meta(router_mapping="logits")
    surgery.apply(a)
    surgery.apply(Candidate.identity(surgery.num_layers, surgery.num_experts))  # another keep too
    surgery.apply(b)
    after_a = logits(model)

    fresh = tiny_model(family)
    Surgery(fresh).apply(b)
    assert torch.equal(after_a, logits(fresh))
    assert not torch.allclose(after_a, original)

    surgery.restore()
    assert torch.equal(logits(model), original)
    assert moe_layers(model)[0].experts.gate_up_proj.shape[0] == surgery.num_experts


def test_identity_candidate_changes_nothing(family):
    model = tiny_model(family)
    original = logits(model)
    surgery = Surgery(model)
    surgery.apply(Candidate.identity(surgery.num_layers, surgery.num_experts))
    assert torch.equal(logits(model), original)


def test_top_k_override_changes_routing():
    model = tiny_model("mixtral")
    surgery = Surgery(model)
    cand = Candidate.from_kept([[0, 1, 2, 3]] * 3, 8, top_k=1)
    surgery.apply(cand)
    layer = surgery.layers[0]
    _, weights, index = layer.block.gate(torch.randn(5, 64))
    assert index.shape == (5, 1) and torch.allclose(weights, torch.ones_like(weights))
    surgery.restore()
    assert surgery.layers[0].gate.top_k == 2


def test_errors_name_the_problem():
    model = tiny_model("mixtral")
    surgery = Surgery(model)
    with pytest.raises(CandidateError, match="3 MoE layers|2 MoE layers"):
        surgery.apply(Candidate.from_kept([[0, 1]] * 2, 8))
    with pytest.raises(CandidateError, match="model has 8"):
        surgery.apply(Candidate.from_kept([[0, 1]] * 3, 6))


def test_a_layer_keeping_fewer_experts_than_top_k_routes_to_all_of_them():
    """Per-layer budgets: a one-expert layer of a top-2 model is that expert with weight 1."""
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    surgery = Surgery(model)
    kept = [[3], [1, 5], [0, 2, 7]]
    surgery.apply(Candidate.from_kept(kept, 8))
    assert [layer.gate.top_k for layer in surgery.layers] == [1, 2, 2]
    with torch.no_grad():
        got = model(ids).logits
    # The same function by hand: the lone expert's output replaces the layer's mixture.
    surgery.restore()
    layer = surgery.layers[0]
    with torch.no_grad():
        experts = layer.experts
        original = layer.block.forward

        def lone_expert(hidden):
            flat = hidden.reshape(-1, hidden.shape[-1])
            index = torch.full((flat.shape[0], 1), 3)
            weight = torch.ones(flat.shape[0], 1)
            return experts(flat, index, weight).reshape(hidden.shape)

        layer.block.forward = lone_expert
        surgery_rest = Candidate.from_kept([list(range(8)), [1, 5], [0, 2, 7]], 8)
        surgery.apply(surgery_rest)
        layer.experts.gate_up_proj = surgery._originals[0].gate_up
        layer.experts.down_proj = surgery._originals[0].down
        layer.experts.num_experts = 8
        want = model(ids).logits
        layer.block.forward = original
    torch.testing.assert_close(got, want)


def test_deepseek_grouped_routing_refuses_bad_keep():
    model = tiny_model("deepseek_v3")  # 32 experts, n_group = 8, groups scored by their top 2
    surgery = Surgery(model)
    with pytest.raises(CandidateError, match="multiple of n_group=8, got keep=12"):
        surgery.apply(Candidate.from_kept([list(range(12))] * surgery.num_layers, 32))
    with pytest.raises(CandidateError, match="at least 2 experts to each of n_group=8"):
        surgery.apply(Candidate.from_kept([list(range(8))] * surgery.num_layers, 32))
    cand = merged_candidate(surgery, keep=16, mapping="probs")
    with pytest.raises(CandidateError, match="sigmoid"):
        surgery.apply(cand)
    surgery.apply(Candidate.from_kept([list(range(0, 32, 2))] * surgery.num_layers, 32))
    v2 = Surgery(tiny_model("deepseek_v2"))  # 16 experts, group_limited_greedy, n_group = 4
    with pytest.raises(CandidateError, match="group_limited_greedy.*multiple of n_group=4"):
        v2.apply(merged_candidate(v2, keep=6, mapping="probs"))


def test_apply_outside_inference_mode_after_an_evaluator_applied_inside_it():
    """The Evaluator applies under inference mode; a later plain apply must still write the tensors."""
    from eep.fitness import Evaluator

    evaluator = Evaluator("builtin:tiny-moe", "add", "search", max_examples=4)
    base = Candidate.random_pruning(4, 8, 2, generator=1)
    merged = Candidate(router_map=[r * 0.9 + 0.1 / 8 for r in base.router_map],
                       expert_merge=base.expert_merge, num_experts=8)
    evaluator.evaluate(merged)  # working tensors and the mapped router made in inference mode
    evaluator.surgery.apply(base)
    evaluator.surgery.apply(merged)  # raised "Inplace update to inference tensor" before
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        logits = evaluator.model(input_ids=ids).logits
    with torch.inference_mode():
        evaluator.surgery.apply(merged)
        again = evaluator.model(input_ids=ids).logits
    assert torch.equal(logits, again)


def test_skipping_on_a_candidate_whose_first_layer_keeps_one_expert():
    """Dynamic skipping reads the model's top-k from all layers, not from a top-1 first layer."""
    from eep.models.skipping import SKIP_KEY, set_skipping

    model = tiny_model("mixtral")
    surgery = Surgery(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    candidate = Candidate.from_kept([[3], [1, 5], [0, 2, 7]], 8)
    surgery.apply(candidate)
    with torch.no_grad():
        plain = model(ids).logits
        set_skipping(model, [0.0, 1.0, 1.0])
        skipped = model(ids).logits
        set_skipping(model, None)
    assert not torch.equal(plain, skipped)
    assert SKIP_KEY == "skip_thresholds"
