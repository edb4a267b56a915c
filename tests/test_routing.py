"""The one routing implementation (`eep.models.routing.route`) against transformers' routers, and
near-one-hot merged candidates against the pure pruning they round to, for every family."""

from __future__ import annotations

import itertools

import pytest
import torch

from eep.candidate import Candidate, CandidateError
from eep.models.families import detect_family, moe_layers
from eep.models.routing import route, router_logits
from eep.models.surgery import Surgery
from eep.models.testing import TINY_FAMILIES, tiny_keep, tiny_model
from eep.oneshot.calibration import Calibration
from eep.oneshot.naee import NAEEError, naee_prune

TOKENS = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(11))

# Routing variants beyond the tiny defaults (which already carry DeepSeek's real values).
VARIANTS = [(f, {}) for f in TINY_FAMILIES] + [
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("deepseek_v2", {"topk_method": "greedy"}),
    ("deepseek_v2", {"num_experts_per_tok": 2}),
    ("deepseek_v2", {"n_group": 8, "topk_group": 3, "num_experts_per_tok": 6}),  # V2's own
    ("deepseek_v3", {"norm_topk_prob": False}),
]


def _dense(weights: torch.Tensor, index: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.zeros(index.shape[0], columns, dtype=torch.float64).scatter_(1, index, weights.double())


@pytest.mark.parametrize(("family", "overrides"), VARIANTS)
def test_route_reproduces_the_stock_router(family, overrides):
    model = tiny_model(family, **overrides)
    routing = detect_family(model.config).routing(model.config)
    x = torch.randn(200, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for layer in moe_layers(model):
        gate = layer.gate
        bias = getattr(gate, "e_score_correction_bias", None)
        with torch.no_grad():
            logits, want_w, want_i = gate(x)
            got_w, got_i = route(router_logits(x, gate.weight, routing), routing, gate.top_k, bias=bias)
        assert got_w.dtype == want_w.dtype
        columns = logits.shape[-1]
        assert torch.equal(_dense(got_w, got_i, columns) != 0, _dense(want_w, want_i, columns) != 0)
        torch.testing.assert_close(_dense(got_w, got_i, columns), _dense(want_w, want_i, columns), rtol=1e-6, atol=1e-6)


def test_every_part_of_deepseek_routing_matters_here():
    """The tiny DeepSeek configs exercise the scaling factor, the groups and the bias."""
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    for family in ("deepseek_v2", "deepseek_v3"):
        model = tiny_model(family)
        gate = moe_layers(model)[0].gate
        routing = detect_family(model.config).routing(model.config)
        bias = getattr(gate, "e_score_correction_bias", None)
        logits = router_logits(x, gate.weight, routing)
        weights, index = route(logits, routing, gate.top_k, bias=bias)
        greedy = torch.topk(logits if bias is None else logits.sigmoid() + bias, gate.top_k).indices
        assert (index.sort().values != greedy.sort().values).any(dim=-1).float().mean() > 0.05
        if bias is not None:
            unbiased = route(logits, routing, gate.top_k)[1]
            assert (index.sort().values != unbiased.sort().values).any()
        assert routing.scaling_factor in (16.0, 2.5) and weights.sum(-1).max() > 1.5


def _near_one_hot(pure: Candidate, noise: float, seed: int = 0) -> Candidate:
    g = torch.Generator().manual_seed(seed)
    return Candidate(
        router_map=[r + noise * torch.rand(r.shape, generator=g) for r in pure.router_map],
        expert_merge=[m + noise * torch.rand(m.shape, generator=g) for m in pure.expert_merge],
        num_experts=pure.num_experts,
        router_mapping="probs",
    )


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_near_one_hot_merge_gives_the_pure_pruning_logits(family):
    """One-hot + 1e-6 noise in probs mode runs the mapped router; it must compute the pruning.

    The noise itself moves the logits by ~1e-4 (1e-8 noise: ~4e-6, float32 rounding); a routing
    part the mapped router forgot moves them by O(1) (DeepSeek-V2's factor 16: ~6).
    """
    model = tiny_model(family)
    surgery = Surgery(model)
    pure = Candidate.random_pruning(
        surgery.num_layers, surgery.num_experts, tiny_keep(family), generator=torch.Generator().manual_seed(4)
    )
    merged = _near_one_hot(pure, 1e-6)
    assert not merged.router_has_stock_equivalent()  # the mapped router, not the stock gate
    surgery.apply(pure)
    with torch.no_grad():
        want = model(TOKENS).logits
    if family == "deepseek_v3":
        with pytest.raises(CandidateError, match="deepseek_v3: experts are scored with a sigmoid"):
            surgery.apply(merged)
        return
    surgery.apply(merged)
    with torch.no_grad():
        got = model(TOKENS).logits
    assert float((got - want).abs().max()) < 1e-3


@torch.no_grad()
def _brute_force_losses(model, calibration, keep):
    """Loss of every dropped set of the only MoE layer: sum over batches of ||Z - pruned(X)||_F."""
    layer = moe_layers(model)[0]
    inputs = []
    handle = layer.block.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )
    for batch in calibration:
        model(input_ids=batch.input_ids, use_cache=False)
    handle.remove()
    targets = [layer.block(x) for x in inputs]
    surgery = Surgery(model)
    num = surgery.num_experts
    losses = {}
    for dropped in itertools.combinations(range(num), num - keep):
        surgery.apply(Candidate.from_kept([[e for e in range(num) if e not in dropped]], num))
        block = moe_layers(model)[0].block
        losses[dropped] = sum(float((z.double() - block(x).double()).norm()) for x, z in zip(inputs, targets, strict=True))
    surgery.restore()
    return losses


def test_naee_scores_grouped_scaled_deepseek_v2_like_real_pruning():
    # One MoE layer (the first is dense); 8 experts in 2 groups, one group chosen, factor 16.
    model = tiny_model(
        "deepseek_v2", num_layers=2, num_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2
    )
    rows = torch.randint(3, 96, (6, 10), generator=torch.Generator().manual_seed(3)).tolist()
    calibration = Calibration.from_ids(rows, batch_size=3)
    result = naee_prune(model, calibration, keep=4)
    want = _brute_force_losses(model, calibration, keep=4)
    got = result.losses[0]
    assert got.keys() == want.keys()
    for dropped, loss in want.items():
        assert got[dropped] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    with pytest.raises(NAEEError, match="multiple of n_group=2"):
        naee_prune(model, calibration, keep=3)
    with pytest.raises(NAEEError, match="beam search"):
        naee_prune(model, calibration, keep=4, max_subsets=10)
