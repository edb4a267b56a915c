"""Frequency, soft-activation and REAP scores against a hand-written computation on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eep.models.families import moe_layers
from eep.models.testing import tiny_model
from eep.oneshot.calibration import Calibration
from eep.oneshot.criteria import criteria_scores, keep_top, random_candidate


def _calibration() -> Calibration:
    g = torch.Generator().manual_seed(11)
    rows = torch.randint(3, 96, (8, 14), generator=g).tolist()
    return Calibration.from_ids([r[: 5 + i] for i, r in enumerate(rows)], batch_size=4)


@torch.no_grad()
def _independent(model, calibration, renormalize: bool):
    """The three criteria from captured block inputs, the gate weight and the expert tensors."""
    layers = moe_layers(model)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [
        layer.block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs[i].append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    for batch in calibration:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    for h in handles:
        h.remove()
    masks = torch.cat([b.attention_mask.reshape(-1) for b in calibration]).bool()
    out = {"frequency": [], "soft_activation": [], "reap": []}
    for i, layer in enumerate(layers):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[i]])[masks]  # [N, d]
        probs = torch.softmax(x @ layer.gate.weight.T, dim=-1)
        top, index = torch.topk(probs, 2, dim=-1)
        weights = top / top.sum(-1, keepdim=True) if renormalize else top
        num_experts = probs.shape[1]
        inter = layer.experts.down_proj.shape[-1]
        freq, reap = torch.zeros(num_experts), torch.zeros(num_experts)
        for e in range(num_experts):
            gate_up = layer.experts.gate_up_proj[e]
            f = (F.silu(x @ gate_up[:inter].T) * (x @ gate_up[inter:].T)) @ layer.experts.down_proj[e].T
            routed = index == e  # [N, 2]
            rows = routed.any(-1)
            freq[e] = routed.sum()
            g = (weights * routed).sum(-1)[rows]
            reap[e] = (g * f[rows].norm(dim=-1)).sum() / max(int(rows.sum()), 1)
        out["frequency"].append(freq)
        out["soft_activation"].append(probs.mean(0))
        out["reap"].append(reap)
    return {k: torch.stack(v).double() for k, v in out.items()}


@pytest.mark.parametrize(("family", "renormalize"), [("mixtral", True), ("olmoe", False)])
def test_criteria_match_an_independent_computation(family, renormalize):
    model = tiny_model(family, num_layers=2)
    calibration = _calibration()
    scores = criteria_scores(model, calibration)
    want = _independent(model, calibration, renormalize)
    assert scores.tokens == calibration.tokens
    assert torch.equal(scores.frequency, want["frequency"])
    assert torch.allclose(scores.soft_activation, want["soft_activation"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(scores.reap, want["reap"], rtol=1e-4, atol=1e-6)
    for name in ("frequency", "soft_activation", "reap"):
        cand = scores.candidate(name, 4, "tiny")
        assert cand.extra["method"] == name and cand.phase == "oneshot"
        assert cand.kept_experts() == keep_top(want[name], 4)


def test_keep_top_ties_and_order():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert keep_top(scores, 2) == [[1, 2], [0, 1]]  # ties go to the lower index
    assert keep_top(scores, 3) == [[1, 2, 4], [0, 1, 2]]
    with pytest.raises(ValueError):
        keep_top(scores, 6)


def test_random_candidate_is_seeded():
    a, b = random_candidate(3, 8, 4, seed=5), random_candidate(3, 8, 4, seed=5)
    assert a.kept_experts() == b.kept_experts() and a.extra == {"method": "random", "seed": 5}
    assert all(len(k) == 4 and k == sorted(k) for k in a.kept_experts())
