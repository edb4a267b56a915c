"""CoordinateDescent: finds a separable optimum, waits for its group, starts, budget, ties."""

from __future__ import annotations

import numpy as np
import pytest
from test_search_fitness import run_to_end

from eep.candidate import Candidate
from eep.result import FitnessResult
from eep.search import CoordinateDescent, CoordinateDescentSettings


class Separable:
    """score = mean over layers of the summed hidden values of the kept experts."""

    def __init__(self, num_layers: int, num_experts: int, seed: int = 0) -> None:
        self.values = np.random.default_rng(seed).random((num_layers, num_experts))

    def optimum(self, keep: int) -> list[list[int]]:
        return [sorted(np.argsort(-v)[:keep].tolist()) for v in self.values]

    def __call__(self, candidate: Candidate) -> FitnessResult:
        kept = candidate.kept_experts()
        score = float(np.mean([self.values[i, k].sum() for i, k in enumerate(kept)]))
        return FitnessResult(score=score, metric="separable")


def _flat(candidate):
    return FitnessResult(score=0.5, metric="m")


def test_finds_the_optimum_of_a_separable_fitness_and_converges():
    fitness = Separable(4, 8, seed=0)
    strategy = CoordinateDescent(CoordinateDescentSettings(keep=2), 4, 8, seed=0)
    run_to_end(strategy, fitness, batch=5)
    best, score = strategy.best(1)[0]
    assert best.kept_experts() == fitness.optimum(2)
    assert strategy.converged and strategy.sweep == 2
    # Sweep 1: 4 groups x C(8, 2) = 28 subsets; sweep 2 tries the 27 others per group, and the
    # last group's are all known from sweep 1 (same context), so they are not re-evaluated.
    assert strategy.evaluations == 4 * 28 + 3 * 27


def test_first_sweep_prunes_on_top_of_the_full_model():
    strategy = CoordinateDescent(CoordinateDescentSettings(keep=2), 3, 6, seed=0)
    first = strategy.ask(100)
    assert len(first) == 15, "C(6, 2) subsets of the first group, nothing else yet"
    assert all(c.keep_per_layer == [2, 6, 6] for c in first)
    assert strategy.ask(5) == [], "all asked, none told: wait"
    for c in first[:-1]:
        strategy.tell(c, _flat(c))
    assert strategy.ask(5) == [], "one still in flight: wait"
    strategy.tell(first[-1], FitnessResult(score=0.9, metric="m"))
    second = strategy.ask(100)
    assert len(second) == 15 and all(c.keep_per_layer == [2, 2, 6] for c in second)
    assert all(c.kept_experts()[0] == first[-1].kept_experts()[0] for c in second)
    assert all(c.parents == (first[-1].id,) for c in second)
    assert strategy.best(5) == [], "no candidate prunes every layer yet"


def test_ties_keep_the_incumbent_and_end_the_search():
    strategy = CoordinateDescent(CoordinateDescentSettings(keep=2), 2, 4, seed=0)
    run_to_end(strategy, _flat)
    # Sweep 1 takes the first subset of each group ([0, 1]); sweep 2 finds nothing better.
    assert strategy.best(1)[0][0].kept_experts() == [[0, 1], [0, 1]]
    assert strategy.converged and strategy.sweep == 2


def test_random_start_uses_the_best_random_pruning():
    fitness = Separable(3, 8, seed=1)
    settings = CoordinateDescentSettings(keep=2, start="random", random_starts=5, max_sweeps=1)
    strategy = CoordinateDescent(settings, 3, 8, seed=2)
    starts = strategy.ask(50)
    assert len(starts) == 5 and all(c.phase == "init" and c.is_pure_pruning() for c in starts)
    assert strategy.ask(1) == []
    for c in starts:
        strategy.tell(c, fitness(c))
    best_start = max(starts, key=lambda c: fitness(c).score)
    trials = strategy.ask(50)
    assert len(trials) == 27 and all(c.parents == (best_start.id,) for c in trials)
    assert all(c.kept_experts()[1:] == best_start.kept_experts()[1:] for c in trials)
    for c in trials:
        strategy.tell(c, fitness(c))
    run_to_end(strategy, fitness)
    assert strategy.best(1)[0][0].kept_experts() == fitness.optimum(2)


def test_given_start_is_evaluated_first():
    start = Candidate.from_kept([[3, 1], [0, 2]], 4, id="naee-7")
    strategy = CoordinateDescent(CoordinateDescentSettings(keep=2), 2, 4, start_from=start)
    first = strategy.ask(10)
    assert len(first) == 1 and first[0].parents == ("naee-7",)
    assert first[0].kept_experts() == [[1, 3], [0, 2]]
    with pytest.raises(ValueError, match="not pure pruning"):
        merged = start.clone()
        merged.router_map[0][0, 0] = 0.5
        CoordinateDescent(CoordinateDescentSettings(keep=2), 2, 4, start_from=merged)


def test_large_subset_spaces_are_sampled_with_the_seed():
    settings = CoordinateDescentSettings(keep=4, max_subsets_per_layer=20)
    runs = [CoordinateDescent(settings, 2, 12, seed=5).ask(100) for _ in range(2)]
    assert len(runs[0]) == 20, "C(12, 4) = 495 > 20: a sample of 20"
    assert len({tuple(c.kept_experts()[0]) for c in runs[0]}) == 20
    assert [c.content_hash() for c in runs[0]] == [c.content_hash() for c in runs[1]]
    other = CoordinateDescent(settings, 2, 12, seed=6).ask(100)
    assert [c.content_hash() for c in other] != [c.content_hash() for c in runs[0]]


def test_budget_can_end_a_group_early():
    strategy = CoordinateDescent(CoordinateDescentSettings(keep=2, budget=10), 2, 8, seed=0)
    fitness = Separable(2, 8, seed=3)
    run_to_end(strategy, fitness, batch=3)
    assert strategy.done and strategy.evaluations == 10 and not strategy.converged


def test_groups_are_searched_as_one():
    fitness = Separable(4, 6, seed=4)
    settings = CoordinateDescentSettings(keep=2, groups=[[0, 1], [2, 3]])
    strategy = CoordinateDescent(settings, 4, 6, seed=0)
    run_to_end(strategy, fitness)
    kept = strategy.best(1)[0][0].kept_experts()
    assert kept[0] == kept[1] and kept[2] == kept[3]
    summed = [fitness.values[0] + fitness.values[1], fitness.values[2] + fitness.values[3]]
    assert [kept[0], kept[2]] == [sorted(np.argsort(-v)[:2].tolist()) for v in summed]
