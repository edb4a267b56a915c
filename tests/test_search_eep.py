"""EEPStrategy: operators, parent selection, phases, seeding, failures, and that it searches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_search_fitness import SyntheticFitness, run_to_end

from eep.candidate import Candidate
from eep.result import FitnessResult
from eep.search import EEPSettings, EEPStrategy, RandomSearch, RandomSearchSettings
from eep.search.eep import (
    absolute_pool_end,
    continuous_mutate,
    crossover,
    discrete_mutate,
    draw_flags,
    normalise_rows,
    select_crossover_parents,
    select_mutation_parent,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _pruning(experts: list[int], num_experts: int = 8) -> torch.Tensor:
    return torch.eye(num_experts)[experts]


def _is_pruning_group(m: torch.Tensor) -> bool:
    one_hot = bool(((m == 0) | (m == 1)).all() and (m.sum(dim=1) == 1).all())
    return one_hot and len(set(m.argmax(dim=1).tolist())) == m.shape[0]


# ------------------------------------------------------------------------------------ operators
def test_discrete_mutation_keeps_rows_one_hot_and_experts_distinct():
    rng = _rng(1)
    changed = 0
    for _ in range(200):
        merge = [_pruning(sorted(rng.choice(8, 4, replace=False).tolist())) for _ in range(3)]
        flags = [True, False, bool(rng.random() < 0.5)]
        out = discrete_mutate(merge, flags, prob=0.5, rng=rng)
        assert all(_is_pruning_group(m) for m in out)
        assert torch.equal(out[1], merge[1]), "an unflagged group must not change"
        changed += not torch.equal(out[0], merge[0])
    assert changed > 150  # flagged, p=0.5 per row: almost always a new expert somewhere


def test_discrete_mutation_with_all_experts_kept_can_only_keep_them():
    out = discrete_mutate([_pruning(list(range(8)))], [True], prob=1.0, rng=_rng())
    assert torch.equal(out[0], _pruning(list(range(8))))


def test_continuous_mutation_touches_only_flagged_matrices():
    genome = [_pruning([0, 1, 2, 3]) for _ in range(4)]
    before = [m.clone() for m in genome]
    out = continuous_mutate(genome, [True, False, True, False], prob=1.0, scale=0.065, rng=_rng())
    assert all(torch.equal(a, b) for a, b in zip(genome, before, strict=True)), "inputs untouched"
    assert not torch.equal(out[0], genome[0]) and not torch.equal(out[2], genome[2])
    assert torch.equal(out[1], genome[1]) and torch.equal(out[3], genome[3])
    assert (out[0] != genome[0]).all(), "p=1 perturbs every entry"
    assert 0.03 < float((out[0] - genome[0]).std()) < 0.12


def test_continuous_mutation_entry_probability():
    out = continuous_mutate([torch.zeros(50, 40)], [True], prob=0.25, scale=1.0, rng=_rng(3))
    assert 0.2 < float((out[0] != 0).float().mean()) < 0.3


def test_crossover_rows_come_from_the_parents():
    rng = _rng(2)
    first = [torch.full((4, 8), 1.0) + torch.arange(4)[:, None] for _ in range(3)]
    second = [torch.full((4, 8), -1.0) - torch.arange(4)[:, None] for _ in range(3)]
    from_first_rows = from_first_mats = 0
    for _ in range(300):
        child = crossover(first, second, [True, False, True], from_front_prob=0.6, rng=rng)
        for g in (0, 2):
            for i in range(4):
                assert torch.equal(child[g][i], first[g][i]) or torch.equal(
                    child[g][i], second[g][i]
                )
                from_first_rows += torch.equal(child[g][i], first[g][i])
        assert torch.equal(child[1], first[1]) or torch.equal(child[1], second[1])
        from_first_mats += torch.equal(child[1], first[1])
    assert 0.55 < from_first_rows / 2400 < 0.65
    assert 0.5 < from_first_mats / 300 < 0.7


def test_normalisation_rows_sum_to_one_and_zero_rows_survive():
    m = torch.tensor([[0.5, 0.5, 0.5], [2.0, -1.0, 1.0], [0.3, -0.3, 0.0]])
    out = normalise_rows([m])[0]
    assert torch.allclose(out[:2].sum(dim=1), torch.ones(2))
    assert torch.equal(out[2], m[2]), "a row summing to 0 is left alone, not divided by 0"


def test_flags_are_redrawn_until_one_is_set():
    rng = _rng(4)
    for _ in range(100):
        assert any(draw_flags([0.01] * 6, rng))
    with pytest.raises(ValueError, match="0"):
        draw_flags([0.0, 0.0], rng)


# ------------------------------------------------------------------------------------ selection
def _draws(fn, times: int = 2000) -> set:
    return {fn() for _ in range(times)}


def test_absolute_pool_end():
    assert absolute_pool_end([0.90, 0.90, 0.89, 0.86, 0.80], 0.03) == 3
    assert absolute_pool_end([0.5, 0.5, 0.5], 0.03) == 2, "none outside: the last index"
    assert absolute_pool_end([0.7], 0.03) == 0
    # 0.83 - 0.82 is 0.01000000000000001 in floats: exactly one point is not above 1 point.
    assert absolute_pool_end([0.83, 0.82, 0.80], 0.01) == 2


def test_mutation_pool_includes_the_first_candidate_outside_the_threshold():
    scores = [0.90, 0.90, 0.89, 0.86, 0.80]
    rng = _rng(5)
    picks = _draws(lambda: select_mutation_parent(scores, "absolute", 0.03, 0, rng))
    assert picks == {0, 1, 2, 3}, "authors' off-by-one: index i* itself is in the pool"
    picks = _draws(lambda: select_mutation_parent(scores, "absolute", 0.03, 4, rng))
    assert picks == {0, 1, 2, 3, 4}, "rank raises the pool end"
    picks = _draws(lambda: select_mutation_parent(scores, "ranking", 0.03, 1, rng))
    assert picks == {0, 1}
    picks = _draws(lambda: select_mutation_parent(scores[:2], "ranking", 0.0, 9, rng))
    assert picks == {0, 1}, "clipped to the last index"
    assert select_mutation_parent([0.3], "absolute", 0.03, 0, rng) == 0


def test_crossover_pool_excludes_the_first_candidate_outside_the_threshold():
    rng = _rng(6)
    scores = [0.9, 0.9, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3]
    pairs = _draws(lambda: select_crossover_parents(scores, "absolute", 0.01, 0, rng))
    assert {i for pair in pairs for i in pair} == {0, 1, 2}
    assert all(a != b for a, b in pairs)
    assert (0, 1) in pairs and (1, 0) in pairs, "ordered: the first drawn is the front parent"
    pairs = _draws(lambda: select_crossover_parents(scores, "absolute", 0.01, 6, rng))
    assert {i for pair in pairs for i in pair} == set(range(6)), "authors' default minimum of 6"
    pairs = _draws(lambda: select_crossover_parents(scores, "ranking", 0.0, 3, rng))
    assert {i for pair in pairs for i in pair} == {0, 1, 2}
    assert select_crossover_parents([0.9, 0.5], "absolute", 0.01, 0, rng) is None
    assert select_crossover_parents([0.9], "absolute", 0.01, 6, rng) is None


# ------------------------------------------------------------------------------------ strategy
def _serial(strategy: EEPStrategy, fitness) -> list[Candidate]:
    asked = []
    while not strategy.done:
        batch = strategy.ask(1)
        if not batch:
            assert strategy.done, "nothing asked, nothing pending, not done"
            break
        asked += batch
        strategy.tell(batch[0], fitness(batch[0]))
    return asked


def test_phases_follow_the_number_of_told_results():
    settings = EEPSettings(keep=4, init_population=5, discrete_iter=12, total_iter=30)
    strategy = EEPStrategy(settings, num_layers=3, num_experts=8, seed=0)
    assert strategy.phase == "init"
    asked = _serial(strategy, SyntheticFitness(3, 8, 4, seed=0))
    phases = [c.phase for c in asked]
    # Authors, one worker: inits, children bred while n <= discrete_iter, then n up to total_iter.
    assert phases == ["init"] * 5 + ["prune"] * (12 + 1 - 5) + ["merge"] * (30 - 12)
    assert strategy.evaluations == 31 and strategy.done and strategy.ask(5) == []
    for c in asked[:13]:
        assert c.is_pure_pruning()
        assert all(len(set(k)) == 4 for k in c.kept_experts())
    assert any(not c.is_pure_pruning() for c in asked[13:])


def test_default_iteration_counts():
    # With the defaults a single worker runs 31 inits, 70 pruning and 300 merging children.
    s = EEPSettings(keep=2)
    assert s.init_population == 31
    assert s.discrete_iter + 1 - s.init_population == 70
    assert s.total_iter - s.discrete_iter == 300


def test_steady_state_breeds_from_told_results_only():
    settings = EEPSettings(keep=2, init_population=3, discrete_iter=50, total_iter=60)
    strategy = EEPStrategy(settings, num_layers=2, num_experts=8, seed=1)
    inits = strategy.ask(10)
    assert len(inits) == 3 and strategy.ask(4) == [], "no told result yet: nothing to breed from"
    strategy.tell(inits[1], FitnessResult(score=0.5, metric="m"))
    children = strategy.ask(3)
    assert len(children) == 3
    assert all(c.parents == (inits[1].id,) and c.phase == "prune" for c in children)


def test_failed_inits_are_replaced_and_never_become_parents():
    settings = EEPSettings(keep=2, init_population=3, discrete_iter=20, total_iter=30)
    strategy = EEPStrategy(settings, num_layers=2, num_experts=8, seed=2)
    first = strategy.ask(3)
    for c in first:
        strategy.tell(c, FitnessResult.failure("out of memory"))
    more = strategy.ask(2)
    assert [c.phase for c in more] == ["init", "init"], "all inits failed: draw more, do not hang"
    strategy.tell(more[0], FitnessResult(score=0.4, metric="m"))
    strategy.tell(more[1], FitnessResult.failure("boom"))
    children = strategy.ask(20)
    assert children and all(c.parents == (more[0].id,) for c in children)
    assert strategy.best(5) == [(more[0], 0.4)]


def test_init_from_seeds_the_first_inits():
    given = [
        Candidate.from_kept([[7, 1], [0, 3], [2, 5]], 8, id="naee-0"),
        Candidate.from_kept([[7, 1], [0, 3], [2, 5]], 8, id="naee-dup"),
        Candidate.from_kept([[0, 1], [0, 1], [0, 1]], 8),
    ]
    settings = EEPSettings(keep=2, init_population=4)
    strategy = EEPStrategy(settings, num_layers=3, num_experts=8, seed=0, init_from=given)
    inits = strategy.ask(10)
    assert len(inits) == 4 and all(c.phase == "init" for c in inits)
    assert inits[0].kept_experts() == [[1, 7], [0, 3], [2, 5]], "rows sorted, like the authors'"
    assert inits[0].parents == ("naee-0",) and inits[1].parents == ()
    assert inits[1].kept_experts() == [[0, 1]] * 3, "the duplicate was skipped"
    assert [c.extra["operator"] for c in inits] == ["given", "given", "random", "random"]


def test_init_from_is_checked():
    settings = EEPSettings(keep=2, groups=1)
    mixed = Candidate.from_kept([[0, 1], [2, 3]], 8, id="x")
    with pytest.raises(ValueError, match="share group 0; use groups: per_layer"):
        EEPStrategy(settings, 2, 8, init_from=[mixed])
    with pytest.raises(ValueError, match="keeps \\[3\\] experts per layer, not 2"):
        EEPStrategy(settings, 2, 8, init_from=[Candidate.from_kept([[0, 1, 2]] * 2, 8)])
    merged = Candidate.from_kept([[0, 1]] * 2, 8)
    merged.expert_merge[0][0, 5] = 0.5
    with pytest.raises(ValueError, match="not pure pruning"):
        EEPStrategy(settings, 2, 8, init_from=[merged])


def test_groups_share_matrices_in_every_candidate():
    settings = EEPSettings(
        keep=2, groups=[[0, 1], [2, 4]], init_population=4, total_iter=40, discrete_iter=15
    )
    strategy = EEPStrategy(settings, num_layers=5, num_experts=6, seed=3)
    for c in _serial(strategy, SyntheticFitness(5, 6, 2, seed=3)):
        for a, b in ((0, 1), (2, 3), (3, 4)):
            assert torch.equal(c.expert_merge[a], c.expert_merge[b])
            assert torch.equal(c.router_map[a], c.router_map[b])


def test_a_space_smaller_than_the_init_population_ends_the_inits_and_stalls_cleanly():
    settings = EEPSettings(keep=2, init_population=5, discrete_iter=50)
    strategy = EEPStrategy(settings, num_layers=1, num_experts=3, seed=0)
    asked = _serial(strategy, lambda c: FitnessResult(score=0.5, metric="m"))
    assert len(asked) == 3 and strategy.done, "3 distinct prunings exist; none is asked twice"


def test_prune_only_best_ignores_the_merging_phase():
    settings = EEPSettings(keep=2, init_population=4, discrete_iter=10, total_iter=25)
    strategy = EEPStrategy(settings, num_layers=2, num_experts=4, seed=0)
    # Merged candidates score higher than any pruning here.
    _serial(
        strategy, lambda c: FitnessResult(score=0.1 if c.is_pure_pruning() else 0.9, metric="m")
    )
    assert strategy.best(1)[0][0].phase == "merge"
    prune_only = strategy.prune_only_best(3)
    assert len(prune_only) == 3 and all(c.is_pure_pruning() for c, _ in prune_only)


def test_ties_are_broken_by_the_seed():
    # Ranking selection with rank 0 always takes the first ranked entry. Every score is equal, so
    # without the tie shuffle that is always the first told candidate; with it, any of them, in
    # an order that follows the seed.
    settings = EEPSettings(
        keep=2,
        init_population=6,
        discrete_iter=40,
        total_iter=40,
        mutate_parents_select_type="ranking",
        mutate_parents_rank=0,
    )
    flat = lambda c: FitnessResult(score=0.5, metric="m")  # noqa: E731
    parents = []
    for seed in (0, 1):
        asked = _serial(EEPStrategy(settings, num_layers=2, num_experts=8, seed=seed), flat)
        children = [c for c in asked if c.phase == "prune"]
        assert len(children) > 20
        parents.append([c.parents[0] for c in children])
        spread = set(parents[-1])
        assert len(spread) > 10, f"ties not shuffled: parents {sorted(spread)}"
        assert spread - {c.id for c in asked[:6]}, "children of children must be picked too"
    assert parents[0] != parents[1]


def test_eep_beats_random_pruning_at_equal_budget():
    # Authors' hyper-parameters, fewer iterations (fast); three seeded problems so that the
    # claim does not rest on one lucky draw.
    margins = []
    for seed in range(3):
        fitness = SyntheticFitness(num_layers=8, num_experts=4, keep=2, seed=seed)
        settings = EEPSettings(keep=2, init_population=16, discrete_iter=60, total_iter=150)
        eep = EEPStrategy(settings, num_layers=8, num_experts=4, seed=seed)
        run_to_end(eep, fitness)
        rand = RandomSearch(RandomSearchSettings(keep=2, budget=eep.evaluations), 8, 4, seed=seed)
        run_to_end(rand, fitness)
        assert eep.evaluations == rand.evaluations == 151
        eep_best, rand_best = eep.best(1)[0][1], rand.best(1)[0][1]
        assert eep_best > rand_best, (seed, eep_best, rand_best)
        assert eep_best >= eep.prune_only_best(1)[0][1]
        margins.append(eep_best - rand_best)
    assert sum(margins) / len(margins) >= 0.1, margins
