"""A campaign under a global expert budget, end to end: seeds, search, finale, summary."""

from __future__ import annotations

import json

import pytest

from eep.candidate import Candidate
from eep.models.testing import save_tiny_model
from eep.search.budget import KeepBudget


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    from eep.campaign import run_campaign
    from eep.config import config_from_dict

    root = tmp_path_factory.mktemp("budget")
    model = save_tiny_model(root / "model", "mixtral", num_layers=4)
    config = config_from_dict({
        "name": "budget",
        "model": model,
        "task": {"name": "compare", "source": {"kind": "builtin", "name": "compare"},
                 "splits": {"search": 8, "dev": 8, "test": 8}},
        "keep": 2, "keep_min": 1, "keep_max": 4,
        "strategy": {"kind": "eep", "init_population": 6, "discrete_iter": 24, "total_iter": 34},
        "init_from": ["naee", "reap"],
        "final": {"random_baselines": 2, "dev_top": 3},
        "workers": 0,
        "evaluation": {"device": "cpu", "threads": 1},
        "output": {"run_dir": str(root / "run"), "export": True},
    })
    return run_campaign(config, quiet=True)


def test_every_scored_candidate_meets_the_budget(budget_run):
    budget = KeepBudget(8, 1, 4, num_layers=4, num_experts=8)
    run = budget_run.run_dir
    records = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    ids = {r["id"] for r in records if r.get("id") and r["id"] != "full"}
    allocations = set()
    for path in sorted((run / "candidates").glob("*.safetensors")):
        candidate = Candidate.load(path)
        budget.check(candidate.keep_per_layer, path.name)
        allocations.add(tuple(candidate.keep_per_layer))
    assert len(allocations) > 3  # the search moved slots between layers
    assert ids  # the search wrote its records
    budget.check(budget_run.best.keep_per_layer, "best")
    for seed in ("init_naee", "init_reap"):
        budget.check(Candidate.load(run / f"{seed}.safetensors").keep_per_layer, seed)


def test_summary_names_the_budget(budget_run):
    summary = budget_run.summary
    assert summary["keep"] == 2
    assert summary["keep_budget"] == "8 experts over 4 layers (1..4 each)"
    assert "8 experts over 4 layers (1..4 each) of 8 experts" in budget_run.table
    assert {"full", "random", "eep"} <= set(summary["methods"])
