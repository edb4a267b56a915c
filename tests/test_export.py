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
from eep.models.testing import TINY_FAMILIES, tiny_model

TOKENS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(5))


def _candidate(num_layers: int, kind: str) -> Candidate:
    g = torch.Generator().manual_seed(7)
    base = Candidate.from_kept([[0, 2, 5, 7]] * num_layers, 8)
    if kind == "prune":
        return base
    noisy = [m + 0.05 * torch.randn(m.shape, generator=g) for m in base.expert_merge]
    mapping = "logits" if kind == "logits" else "probs"
    return Candidate(
        router_map=[m + 0.05 * torch.randn(m.shape, generator=g) for m in base.router_map],
        expert_merge=noisy,
        num_experts=8,
        router_mapping=mapping,
    )


CASES = [(f, k) for f in TINY_FAMILIES for k in ("prune", "logits", "probs") if not (f == "deepseek_v3" and k == "probs")]


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_export_round_trip_logits_equal(tmp_path, family, kind):
    source = tmp_path / "source"
    tiny_model(family).save_pretrained(source)
    in_place = tiny_model(family)
    surgery = Surgery(in_place)
    cand = _candidate(surgery.num_layers, kind)
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
        assert config["num_router_experts"] == 8
    assert (tmp_path / "out" / CANDIDATE_FILE).is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert {layer.experts.gate_up_proj.shape[0] for layer in moe_layers(reloaded)} == {4}
    with torch.no_grad():
        got = reloaded(TOKENS).logits
    assert float((got - want).abs().max()) <= 1e-5


def test_export_refuses_mixed_keep(tmp_path):
    source = tmp_path / "source"
    tiny_model("mixtral").save_pretrained(source)
    cand = Candidate.from_kept([[0, 1], [0, 1, 2], [0, 1]], 8)
    with pytest.raises(CandidateError, match="different expert counts"):
        export_model(str(source), cand, tmp_path / "out")


def test_export_refuses_candidate_for_other_model(tmp_path):
    source = tmp_path / "source"
    tiny_model("mixtral").save_pretrained(source)
    with pytest.raises(CandidateError, match="candidate has 32 MoE layers but the model has 3"):
        export_model(str(source), Candidate.from_kept([[0, 1]] * 32, 8), tmp_path / "out")
