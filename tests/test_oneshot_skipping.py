"""NAEE dynamic skipping: the rule against a hand computation, thresholds, Evaluator and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from eep.builtin.tokenizer import build_tokenizer
from eep.candidate import Candidate
from eep.export import export_model
from eep.models.families import moe_layers
from eep.models.skipping import (
    CONFIG_FIELD,
    DynamicSkipping,
    SkippingError,
    installed_skipping,
    set_skipping,
)
from eep.models.surgery import Surgery
from eep.models.testing import TINY_FAMILIES, tiny_model
from eep.oneshot.calibration import Calibration
from eep.oneshot.skipping import calibrate_thresholds, with_skip_thresholds

TOKENS = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(2))


def _expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    gate_up, down = layer.experts.gate_up_proj[e], layer.experts.down_proj[e]
    inter = down.shape[-1]
    return (F.silu(x @ gate_up[:inter].T) * (x @ gate_up[inter:].T)) @ down.T


@torch.no_grad()
def _by_hand(layer, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """Routed output per token with the NAEE rule written out token by token, and the skip count."""
    probs = torch.softmax(x @ layer.gate.weight.T, dim=-1)
    top, index = torch.topk(probs, 2, dim=-1)
    out, skipped = torch.zeros_like(x), 0
    for t in range(x.shape[0]):
        a, b = index[t].tolist()
        if top[t, 1] < threshold * top[t, 0]:
            out[t] = _expert(layer, a, x[t : t + 1])[0]  # weight exactly 1
            skipped += 1
        else:
            w = top[t] / top[t].sum()
            out[t] = w[0] * _expert(layer, a, x[t : t + 1])[0] + w[1] * _expert(layer, b, x[t : t + 1])[0]
    return out, skipped


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_rule_matches_a_hand_computation(threshold):
    model = tiny_model("mixtral", num_layers=1)
    layer = moe_layers(model)[0]
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    skipping = DynamicSkipping(model, [threshold])
    with torch.no_grad():
        _, weights, index = layer.gate(x)
        got = layer.experts(x, index, weights)
    want, skipped = _by_hand(layer, x, threshold)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert skipping.layer_skip_rates() == [skipped / 40]
    assert skipped == {0.0: 0, 1.0: 40}.get(threshold, skipped)  # 1.0: all (no exact ties here)
    assert 0 < skipped < 40 or threshold != 0.5
    skipping.remove()
    assert "forward" not in layer.experts.__dict__


def test_threshold_zero_changes_nothing_and_one_skips_every_second_expert():
    model = tiny_model("mixtral")
    with torch.no_grad():
        plain = model(TOKENS).logits
        skipping = set_skipping(model, [0.0] * 3)
        assert torch.equal(model(TOKENS).logits, plain)
        assert skipping.skipped_fraction() == 0.0
        skipping = set_skipping(model, [1.0] * 3)  # replaces the first
        changed = model(TOKENS).logits
    assert skipping.layer_skip_rates() == [1.0, 1.0, 1.0]
    assert skipping.skipped_fraction() == 0.5  # one of every token's two expert calls
    assert not torch.allclose(changed, plain)
    set_skipping(model, None)
    assert installed_skipping(model) is None
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, plain)


def test_thresholds_are_the_median_ratio_of_calibration_tokens():
    model = tiny_model("mixtral", num_layers=2)
    rows = torch.randint(3, 96, (6, 10), generator=torch.Generator().manual_seed(4)).tolist()
    calibration = Calibration.from_ids(rows, batch_size=3)
    thresholds = calibrate_thresholds(model, calibration)
    # By hand: block inputs, router softmax, p2 / p1, numpy's median.
    inputs = {0: [], 1: []}
    layers = moe_layers(model)
    handles = [
        layer.block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs[i].append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in calibration:
            model(input_ids=batch.input_ids, use_cache=False)
    for h in handles:
        h.remove()
    for i, layer in enumerate(layers):
        x = torch.cat([t.reshape(-1, 64) for t in inputs[i]])
        top = torch.softmax(x @ layer.gate.weight.detach().T, -1).topk(2, -1).values
        assert thresholds[i] == pytest.approx(float(np.median((top[:, 1] / top[:, 0]).numpy())), rel=1e-5)
    # Half of the calibration tokens then skip at layer 0, by construction (60 tokens, the median
    # between the 30th and 31st ratio); later layers see inputs changed by the skipping before.
    skipping = set_skipping(model, thresholds)
    with torch.no_grad():
        for batch in calibration:
            model(input_ids=batch.input_ids, use_cache=False)
    rates = skipping.layer_skip_rates()
    assert rates[0] == 0.5 and abs(rates[1] - 0.5) < 0.1
    set_skipping(model, None)


def test_rejects_what_it_cannot_do():
    with pytest.raises(SkippingError, match="3 MoE layers"):
        DynamicSkipping(tiny_model("mixtral"), [0.5])
    with pytest.raises(SkippingError, match="top-2"):
        DynamicSkipping(tiny_model("mixtral", num_experts_per_tok=3), [0.5] * 3)
    with pytest.raises(SkippingError):
        with_skip_thresholds(Candidate.identity(3, 8), [0.5])


def test_export_carries_thresholds_and_the_class_applies_them(tmp_path):
    source = tmp_path / "source"
    tiny_model("mixtral").save_pretrained(source)
    cand = with_skip_thresholds(Candidate.from_kept([[0, 2, 5, 7]] * 3, 8), [0.3, 0.5, 0.7])
    in_place = tiny_model("mixtral")
    Surgery(in_place).apply(cand)
    set_skipping(in_place, [0.3, 0.5, 0.7])
    with torch.no_grad():
        want = in_place(TOKENS).logits

    report = export_model(str(source), cand, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not report.stock and config["model_type"] == "eep_mixtral"
    assert config[CONFIG_FIELD] == [0.3, 0.5, 0.7] and "num_router_experts" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert all("forward" in layer.experts.__dict__ for layer in moe_layers(reloaded))
    with torch.no_grad():
        assert torch.allclose(reloaded(TOKENS).logits, want, atol=1e-5)


def test_evaluator_scores_with_the_candidates_thresholds(tmp_path):
    from eep.fitness import Evaluator

    tiny_model("mixtral").save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    evaluator = Evaluator(str(tmp_path), "count", max_examples=6)
    pruned = Candidate.from_kept([[0, 2, 5, 7]] * 3, 8)
    plain = evaluator.evaluate(pruned)
    plain_outputs = list(evaluator.last_outputs)
    assert installed_skipping(evaluator.model) is None
    evaluator.evaluate(with_skip_thresholds(pruned, [1.0] * 3))
    skipping = installed_skipping(evaluator.model)
    # Left-padding rows route with exactly tied weights (ties are not skipped): nearly all skip.
    assert skipping is not None and all(rate > 0.8 for rate in skipping.layer_skip_rates())
    # Threshold 0 scores exactly as without skipping; no thresholds removes it.
    assert evaluator.evaluate(with_skip_thresholds(pruned, [0.0] * 3)).hits == plain.hits
    assert evaluator.last_outputs == plain_outputs
    evaluator.evaluate(None)
    assert installed_skipping(evaluator.model) is None


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_skipping_every_second_expert_is_top_1_routing(family):
    """A lone first expert gets what the family's own top-1 router gives it: 1 x the scaling
    factor where top-k is renormalised (Mixtral, Qwen3, DeepSeek-V3: 2.5), its own weight where
    it is not (Qwen2, OLMoE, DeepSeek-V2 with factor 16)."""
    overrides = {"num_experts_per_tok": 2}  # tiny DeepSeek-V2 routes top-3
    skipping, top1 = tiny_model(family, **overrides), tiny_model(family, **overrides)
    for layer in moe_layers(skipping) + moe_layers(top1):
        # The rule keeps the larger weight; DeepSeek-V3's top-1 takes the larger biased score.
        if getattr(layer.gate, "e_score_correction_bias", None) is not None:
            layer.gate.e_score_correction_bias.zero_()
    set_skipping(skipping, [1.0] * len(moe_layers(skipping)))
    surgery = Surgery(top1)
    surgery.apply(Candidate.identity(surgery.num_layers, surgery.num_experts, top_k=1))
    with torch.no_grad():
        got, want = skipping(TOKENS).logits, top1(TOKENS).logits
    assert installed_skipping(skipping).skipped_fraction() == 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
