"""RandomSearch: i.i.d. pure pruning per group, budget, dedup."""

from __future__ import annotations

import torch
from test_search_fitness import run_to_end

from eep.result import FitnessResult
from eep.search import RandomSearch, RandomSearchSettings


def _flat(candidate):
    return FitnessResult(score=0.5, metric="m")


def test_random_search_spends_its_budget_on_distinct_pure_prunings():
    settings = RandomSearchSettings(keep=3, budget=40, groups=2, top_k=2)
    strategy = RandomSearch(settings, num_layers=4, num_experts=8, seed=0, model_id="tiny")
    assert len(strategy.ask(100)) == 40, "never more than the budget"
    assert strategy.ask(1) == [] and not strategy.done, "done once the results are told"
    for c in strategy.pending():
        assert c.is_pure_pruning() and c.keep == 3 and c.top_k == 2
        assert c.phase == "prune" and c.parents == () and c.model_id == "tiny"
        assert all(k == sorted(k) for k in c.kept_experts())
        assert torch.equal(c.expert_merge[0], c.expert_merge[1])  # layers 0-1 share a group
        strategy.tell(c, _flat(c))
    assert strategy.done and strategy.evaluations == 40
    assert len({c.content_hash() for c, _ in strategy.best(40)}) == 40


def test_random_search_stops_when_the_space_is_exhausted():
    strategy = RandomSearch(RandomSearchSettings(keep=2, budget=10), 1, 3, seed=0)
    run_to_end(strategy, _flat)
    assert strategy.done and strategy.evaluations == 3, "only 3 distinct prunings of 3 experts"


def test_random_search_best_ranks_by_score():
    strategy = RandomSearch(RandomSearchSettings(keep=2, budget=6), 2, 6, seed=1)
    batch = strategy.ask(6)
    for i, c in enumerate(batch):
        strategy.tell(c, FitnessResult(score=[0.1, 0.7, 0.3, 0.7, 0.2, 0.0][i], metric="m"))
    assert [c.id for c, _ in strategy.best(3)] == [batch[1].id, batch[3].id, batch[2].id]
