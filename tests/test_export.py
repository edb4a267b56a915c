"""Export round trip: the saved checkpoint computes the in-place surgery's logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eep.candidate import Candidate, CandidateError
from eep.export import CANDIDATE_FILE, export_model
from eep.models.families import moe_layers
from eep.models.surgery import Surgery
from eep.models.testing import TINY_FAMILIES, tiny_keep, tiny_model, tiny_num_experts

TOKENS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(5))


def _candidate(num_layers: int, kind: str, family: str) -> Candidate:
    g = torch.Generator().manual_seed(7)
    num, keep = tiny_num_experts(family), tiny_keep(family)
    kept = sorted(torch.randperm(num, generator=g)[:keep].tolist())
    base = Candidate.from_kept([kept] * num_layers, num)
    if kind == "prune":
        return base
    noisy = [m + 0.05 * torch.randn(m.shape, generator=g) for m in base.expert_merge]
    mapping = "logits" if kind == "logits" else "probs"
    return Candidate(
        router_map=[m + 0.05 * torch.randn(m.shape, generator=g) for m in base.router_map],
        expert_merge=noisy,
        num_experts=num,
        router_mapping=mapping,
    )


CASES = [(f, k) for f in TINY_FAMILIES for k in ("prune", "logits", "probs") if not (f == "deepseek_v3" and k == "probs")]


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_export_round_trip_logits_equal(tmp_path, family, kind):
    source = tmp_path / "source"
    tiny_model(family).save_pretrained(source)
    in_place = tiny_model(family)
    surgery = Surgery(in_place)
    cand = _candidate(surgery.num_layers, kind, family)
    surgery.apply(cand)
    with torch.no_grad():
        want = in_place(TOKENS).logits

    report = export_model(str(source), cand, tmp_path / "out")
    assert report.stock == (kind != "probs")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if report.stock:
        assert config["model_type"] == family  # vanilla transformers loads it
    else:
        assert config["model_type"] == f"eep_{family}"
        assert config["num_router_experts"] == tiny_num_experts(family)
    assert (tmp_path / "out" / CANDIDATE_FILE).is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert {layer.experts.gate_up_proj.shape[0] for layer in moe_layers(reloaded)} == {tiny_keep(family)}
    with torch.no_grad():
        got = reloaded(TOKENS).logits
    assert float((got - want).abs().max()) <= 1e-5


def test_export_refuses_candidate_for_other_model(tmp_path):
    source = tmp_path / "source"
    tiny_model("mixtral").save_pretrained(source)
    with pytest.raises(CandidateError, match="candidate has 32 MoE layers but the model has 3"):
        export_model(str(source), Candidate.from_kept([[0, 1]] * 32, 8), tmp_path / "out")


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_export_of_skipping_deepseek_reloads_the_same_logits(tmp_path, family):
    """DeepSeek-V3 has no probability mapping but its checkpoints can carry dynamic skipping."""
    from eep.models.skipping import installed_skipping, set_skipping
    from eep.oneshot.calibration import Calibration
    from eep.oneshot.skipping import calibrate_thresholds, with_skip_thresholds

    source = tmp_path / "source"
    tiny_model(family, num_experts_per_tok=2).save_pretrained(source)
    in_place = tiny_model(family, num_experts_per_tok=2)
    surgery = Surgery(in_place)
    pruned = _candidate(surgery.num_layers, "prune", family)
    surgery.apply(pruned)
    # Median thresholds of the pruned model on these tokens: about half of them skip.
    thresholds = calibrate_thresholds(in_place, Calibration.from_ids(TOKENS.tolist(), batch_size=2))
    cand = with_skip_thresholds(pruned, thresholds)
    set_skipping(in_place, thresholds)
    with torch.no_grad():
        want = in_place(TOKENS).logits
    assert 0.15 < installed_skipping(in_place).skipped_fraction() < 0.35
    export_model(str(source), cand, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == f"eep_{family}"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((reloaded(TOKENS).logits - want).abs().max()) <= 1e-5
