"""Global expert budgets: the budget object, the slot move, and that every operator keeps the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eep.candidate import Candidate
from eep.config import ConfigError, config_from_dict
from eep.result import FitnessResult
from eep.search import EEPSettings, EEPStrategy, RandomSearch, RandomSearchSettings, build_strategy
from eep.search.budget import BudgetError, KeepBudget, move_slot
from eep.search.settings import CoordinateDescentSettings


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _is_pure_pruning_row_set(m: torch.Tensor) -> bool:
    one_hot = bool(((m == 0) | (m == 1)).all() and (m.sum(dim=1) == 1).all())
    return one_hot and len(set(m.argmax(dim=1).tolist())) == m.shape[0]


# ------------------------------------------------------------------------------------ the budget
def test_budget_refuses_totals_and_bounds_it_cannot_meet():
    with pytest.raises(BudgetError, match="possible totals: 16..64"):
        KeepBudget(70, 1, 4, num_layers=16, num_experts=8)
    with pytest.raises(BudgetError, match="keep_min=3, keep_max=2"):
        KeepBudget(32, 3, 2, num_layers=16, num_experts=8)
    with pytest.raises(BudgetError, match="num_experts=8"):
        KeepBudget(32, 1, 9, num_layers=16, num_experts=8)
    budget = KeepBudget(32, 1, 4, num_layers=16, num_experts=8)
    with pytest.raises(BudgetError, match="layer 3 keeps 5 experts, outside 1..4"):
        budget.check([2, 2, 2, 5] + [2] * 11 + [1])
    with pytest.raises(BudgetError, match="keeps 33 experts in all, the budget is 32"):
        budget.check([3] + [2] * 15)


def test_random_allocations_meet_the_budget_and_vary():
    budget = KeepBudget(32, 1, 4, num_layers=16, num_experts=8)
    rng = _rng(3)
    seen = set()
    for _ in range(300):
        keeps = budget.random_allocation(rng)
        budget.check(keeps)
        seen.add(tuple(keeps))
    assert len(seen) > 250
    assert budget.even_allocation() == [2] * 16
    assert KeepBudget(33, 1, 4, 16, 8).even_allocation() == [2] * 15 + [3]


def test_slot_move_keeps_the_total_the_bounds_and_pure_pruning_rows():
    budget = KeepBudget(12, 1, 4, num_layers=5, num_experts=8)
    rng = _rng(1)
    merge = [torch.eye(8)[sorted(rng.choice(8, k, replace=False).tolist())] for k in (2, 4, 1, 3, 2)]
    moved = 0
    for _ in range(500):
        out = move_slot(merge, budget, rng)
        keeps = [m.shape[0] for m in out]
        budget.check(keeps)
        assert all(_is_pure_pruning_row_set(m) for m in out)
        changed = [i for i, (a, b) in enumerate(zip(out, merge, strict=True)) if a.shape != b.shape]
        assert len(changed) in (0, 2)
        moved += bool(changed)
        merge = out
    assert moved > 400  # a move fits almost always here; it is refused only at the bounds


def test_slot_move_does_nothing_when_no_layer_can_give_or_take():
    budget = KeepBudget(4, 2, 2, num_layers=2, num_experts=8)
    merge = [torch.eye(8)[[0, 1]], torch.eye(8)[[2, 3]]]
    out = move_slot(merge, budget, _rng())
    assert all(torch.equal(a, b) for a, b in zip(out, merge, strict=True))


def test_allocation_by_scores_ranks_experts_across_layers():
    budget = KeepBudget(6, 1, 3, num_layers=3, num_experts=4)
    scores = torch.tensor([
        [10.0, 0.0, 0.0, 0.0],  # one expert does all the work: its layer needs one
        [1.0, 1.0, 1.0, 1.0],  # all equal: this layer wants many
        [4.0, 3.0, 2.0, 1.0],
    ])
    kept = budget.allocate_by_scores(scores)
    assert kept == [[0], [0, 1, 2], [0, 1]]
    budget.check([len(k) for k in kept])


# ------------------------------------------------------------------------------------ searches
def _score(candidate: Candidate) -> FitnessResult:
    """Favours layer 0 keeping 4 experts and layer 3 keeping 1, and low expert indices."""
    keeps = candidate.keep_per_layer
    kept = candidate.kept_experts()
    value = 0.5 - 0.05 * abs(keeps[0] - 4) - 0.05 * abs(keeps[3] - 1)
    value -= 0.005 * sum(sum(k) for k in kept)
    value += 0.01 * float(sum(m.sum() for m in candidate.expert_merge))
    return FitnessResult(score=float(value), metric="acc", count=1, total=1)


def _settings(cls, **kw):
    return cls(keep=2, keep_min=1, keep_max=4, **kw)


@pytest.mark.parametrize("kind", ["eep", "random"])
def test_every_candidate_of_a_search_meets_the_global_budget(kind):
    if kind == "eep":
        strategy = EEPStrategy(
            _settings(EEPSettings, init_population=8, discrete_iter=120, total_iter=220,
                      crossover_prob=0.6), num_layers=6, num_experts=8, seed=2,
        )
    else:
        strategy = RandomSearch(_settings(RandomSearchSettings, budget=150), num_layers=6, num_experts=8, seed=2)
    budget = KeepBudget(12, 1, 4, num_layers=6, num_experts=8)
    allocations, operators = set(), set()
    while not strategy.done:
        asked = strategy.ask(3)
        for candidate in asked:
            budget.check(candidate.keep_per_layer, candidate.id)
            if candidate.phase in ("init", "prune"):
                assert candidate.is_pure_pruning()
            allocations.add(tuple(candidate.keep_per_layer))
            operators.add(candidate.extra.get("operator", ""))
        for candidate in asked:
            strategy.tell(candidate, _score(candidate))
    assert len(allocations) > 20
    best = strategy.best(1)[0][0]
    if kind == "eep":
        assert any("move" in op for op in operators)
        assert any(op.startswith("crossover") for op in operators)
        # The search follows the score towards layer 0 keeping more and layer 3 fewer.
        assert best.keep_per_layer[0] > 2 and best.keep_per_layer[3] < 2


def test_eep_with_a_global_budget_refuses_a_seed_off_the_budget():
    with pytest.raises(ValueError, match="layer 0 keeps 5 experts, outside 1..4"):
        EEPStrategy(
            _settings(EEPSettings), num_layers=2, num_experts=8,
            init_from=[Candidate.from_kept([[0, 1, 2, 3, 4], [0]], 8, id="x")],
        )
    with pytest.raises(ValueError, match="keeps 3 experts in all, the budget is 4"):
        EEPStrategy(
            _settings(EEPSettings), num_layers=2, num_experts=8,
            init_from=[Candidate.from_kept([[0, 1], [0]], 8, id="x")],
        )
    # A seed on the budget takes the first init slot.
    strategy = EEPStrategy(
        _settings(EEPSettings), num_layers=2, num_experts=8,
        init_from=[Candidate.from_kept([[0, 1, 2], [5]], 8, id="x")],
    )
    assert strategy.ask(1)[0].keep_per_layer == [3, 1]


def test_the_uniform_budget_is_unchanged_and_checkpoints_its_keep():
    """keep alone (no bounds) is the authors' uniform search; the state still records keep."""
    strategy = EEPStrategy(EEPSettings(keep=2, init_population=4), num_layers=3, num_experts=8, seed=0)
    assert strategy.budget.is_uniform
    assert strategy.state_dict()["keep"] == 2
    assert all(c.keep_per_layer == [2, 2, 2] for c in strategy.ask(4))
    # keep_min = keep_max = keep is the same uniform budget.
    assert not EEPSettings(keep=2, keep_min=2, keep_max=2).global_budget


def test_a_global_budget_resumes_only_into_the_same_budget():
    a = EEPStrategy(_settings(EEPSettings, init_population=4), num_layers=3, num_experts=8, seed=0)
    state = a.state_dict()
    assert state["keep"] == [6, 1, 4]
    b = EEPStrategy(EEPSettings(keep=2, keep_min=1, keep_max=3, init_population=4), num_layers=3, num_experts=8)
    with pytest.raises(ValueError, match="keep"):
        b.load_state_dict(state)


def test_budget_settings_errors_name_the_fields():
    with pytest.raises(ValueError, match="give keep .* or keep_total"):
        EEPSettings()
    with pytest.raises(ValueError, match="give keep .* or keep_total"):
        EEPSettings(keep=2, keep_total=32)
    with pytest.raises(ValueError, match="groups: per_layer"):
        EEPSettings(keep=2, keep_min=1, groups=4)
    with pytest.raises(ValueError, match="keep=5 .* within keep_min..keep_max"):
        EEPSettings(keep=5, keep_min=1, keep_max=4)
    with pytest.raises(ValueError, match="possible totals"):
        build_strategy(EEPSettings(keep_total=70, keep_max=4), 16, 8)
    with pytest.raises(ValueError, match="coordinate_descent searches one keep"):
        build_strategy(CoordinateDescentSettings(keep=2, keep_min=1, keep_max=4), 4, 8)
    # keep_total alone: bounds 1..E; keep_max alone: bounds 1..keep_max.
    assert EEPSettings(keep_total=30).keep_budget(16, 8) == KeepBudget(30, 1, 8, 16, 8)
    assert EEPSettings(keep=2, keep_max=3).keep_budget(16, 8) == KeepBudget(32, 1, 3, 16, 8)


def test_campaign_config_flows_the_budget_into_the_strategy():
    base = {"name": "b", "model": "builtin:tiny-moe", "task": "add", "strategy": {"kind": "eep"}}
    config = config_from_dict({**base, "keep": 2, "keep_min": 1, "keep_max": 4})
    assert (config.strategy.keep, config.strategy.keep_min, config.strategy.keep_max) == (2, 1, 4)
    assert config.strategy.global_budget
    config = config_from_dict({**base, "keep_total": 10})
    assert config.strategy.keep_total == 10 and config.keep is None
    with pytest.raises(ConfigError, match="strategy.keep_min and keep_min disagree"):
        config_from_dict({**base, "keep": 2, "keep_min": 1, "strategy": {"kind": "eep", "keep_min": 2}})
    with pytest.raises(ConfigError, match="give keep"):
        config_from_dict(base)


def test_validate_names_the_file_and_fields_of_a_budget_the_model_cannot_meet(capsys):
    from eep.cli import main

    argv = ["validate", "configs/tiny.yaml", "--set", "keep=null", "--set", "keep_total=70", "--set", "keep_max=4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "configs/tiny.yaml: keep_total=70, keep_max=4: a total of 70 kept experts cannot be split" in err
    assert main(["validate", "configs/tiny.yaml", "--set", "keep_min=1", "--set", "keep_max=4"]) == 0
    assert "a global expert budget" in capsys.readouterr().out


def test_a_global_budget_is_refused_on_grouped_routing(tmp_path):
    """DeepSeek's grouped top-k needs counts in multiples of n_group: refused before any evaluation."""
    from eep.campaign import Campaign
    from eep.models.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "model", "deepseek_v3")
    config = config_from_dict({
        "model": model, "task": "add", "keep": 16, "keep_min": 8, "keep_max": 24,
        "strategy": {"kind": "eep"}, "output": {"run_dir": str(tmp_path / "run")},
    })
    with pytest.raises(ConfigError, match="grouped routing \\(noaux_tc, n_group=8\\) needs every layer"):
        Campaign(config, quiet=True)
    assert not (tmp_path / "run").exists()
    from eep.cli.validate import check_campaign

    with pytest.raises(ValueError, match="needs every layer's count to be a multiple of n_group"):
        check_campaign(config)
