"""The ask/tell protocol, checked the same way for every strategy: ids, dedup, order, failures,
exact resume from a state dict, and a fuzz of random ask sizes and tell orders."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from test_search_fitness import SyntheticFitness, drive

from eep.candidate import Candidate
from eep.result import FitnessResult
from eep.search import (
    CoordinateDescent,
    CoordinateDescentSettings,
    EEPSettings,
    EEPStrategy,
    RandomSearch,
    RandomSearchSettings,
    Strategy,
    build_strategy,
)

LAYERS, EXPERTS, KEEP = 3, 6, 2


def _eep(seed: int = 0, **kw) -> EEPStrategy:
    settings = EEPSettings(keep=KEEP, init_population=6, discrete_iter=30, total_iter=120, **kw)
    return EEPStrategy(settings, LAYERS, EXPERTS, seed=seed)


def _random(seed: int = 0, **kw) -> RandomSearch:
    return RandomSearch(
        RandomSearchSettings(keep=KEEP, budget=120, **kw), LAYERS, EXPERTS, seed=seed
    )


def _cd(seed: int = 0, **kw) -> CoordinateDescent:
    settings = CoordinateDescentSettings(keep=KEEP, budget=150, max_subsets_per_layer=10, **kw)
    return CoordinateDescent(settings, LAYERS, EXPERTS, seed=seed)


def _cd_random_start(seed: int = 0) -> CoordinateDescent:
    return _cd(seed, start="random", random_starts=4)


FACTORIES = {"eep": _eep, "random": _random, "cd": _cd, "cd-random-start": _cd_random_start}


@pytest.fixture(params=sorted(FACTORIES))
def make(request):
    return FACTORIES[request.param]


def _json_leaves_only(value, path="state") -> None:
    """Only JSON types and tensors, string keys."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{path} has a non-string key {k!r}"
            _json_leaves_only(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_leaves_only(v, f"{path}[{i}]")
    else:
        assert value is None or isinstance(value, (bool, int, float, str, torch.Tensor)), (
            f"{path} is a {type(value).__name__}"
        )


def _through_disk(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_every_strategy_follows_the_protocol(make):
    strategy = make()
    assert isinstance(strategy, Strategy)


def test_same_seed_same_calls_same_candidates(make):
    fitness = SyntheticFitness(LAYERS, EXPERTS, KEEP, seed=7)
    runs = []
    for _ in range(2):
        asked = drive(make(seed=3), fitness, random.Random(11), steps=30)
        runs.append([(c.id, c.content_hash(), c.parents) for c in asked])
    assert runs[0] == runs[1]
    other = drive(make(seed=4), fitness, random.Random(11), steps=30)
    assert [c.content_hash() for c in other] != [h for _, h, _ in runs[0]]


def test_state_dict_round_trip_continues_identically(make):
    fitness = SyntheticFitness(LAYERS, EXPERTS, KEEP, seed=1)
    first, driver = make(seed=5), random.Random(2)
    in_flight: list[Candidate] = []
    drive(first, fitness, driver, steps=20, in_flight=in_flight, fail_prob=0.1)
    in_flight += first.ask(3)
    assert first.evaluations > 10 and not first.done
    assert first.pending(), "snapshot with results in flight"
    state = first.state_dict()
    _json_leaves_only(state)
    json.dumps(state, default=lambda t: t.tolist())  # JSON apart from the tensors

    second = make(seed=999)  # the seed comes back from the state
    second.load_state_dict(_through_disk(state))
    assert [c.id for c in second.pending()] == [c.id for c in first.pending()]
    driver_copy = random.Random()
    driver_copy.setstate(driver.getstate())
    flight_copy = list(in_flight)
    a = drive(first, fitness, driver, steps=40, in_flight=in_flight, fail_prob=0.1)
    b = drive(second, fitness, driver_copy, steps=40, in_flight=flight_copy, fail_prob=0.1)
    assert a, "the continuation must ask something"
    assert [(c.id, c.content_hash(), c.parents, c.phase) for c in a] == [
        (c.id, c.content_hash(), c.parents, c.phase) for c in b
    ]
    assert first.evaluations == second.evaluations
    assert [(c.id, s) for c, s in first.best(5)] == [(c.id, s) for c, s in second.best(5)]
    assert first.state_dict()["search"]["rng"] == second.state_dict()["search"]["rng"]


def test_results_told_in_any_order(make):
    strategy = make()
    fitness = SyntheticFitness(LAYERS, EXPERTS, KEEP, seed=2)
    batch = strategy.ask(5)
    assert batch
    for c in reversed(batch):
        strategy.tell(c, fitness(c))
    assert [e.candidate.id for e in strategy.archive] == [c.id for c in reversed(batch)]
    assert strategy.evaluations == len(batch)


def test_tell_rejects_unknown_and_repeated_ids(make):
    strategy = make()
    c = strategy.ask(1)[0]
    strategy.tell(c, FitnessResult(score=0.5, metric="m"))
    with pytest.raises(KeyError, match="told already"):
        strategy.tell(c, FitnessResult(score=0.5, metric="m"))
    with pytest.raises(KeyError, match="was not asked"):
        strategy.tell(c.with_meta(id="nope"), FitnessResult(score=0.5, metric="m"))
    with pytest.raises(ValueError, match="n must be >= 0"):
        strategy.ask(-1)


def test_failed_and_non_finite_results_never_rank(make):
    strategy = make()
    batch = strategy.ask(3)
    strategy.tell(batch[0], FitnessResult.failure("CUDA error"))
    strategy.tell(batch[1], FitnessResult(score=float("nan"), metric="m"))
    strategy.tell(batch[2], FitnessResult(score=0.2, metric="m"))
    assert [e.failed for e in strategy.archive] == [True, True, False]
    if batch[2].keep_per_layer == [KEEP] * LAYERS:
        assert strategy.best(3) == [(batch[2], 0.2)]
    else:
        # Coordinate descent's first candidates keep all experts in later groups: not final ones.
        assert strategy.best(3) == []
    assert strategy.evaluations == 3


def test_best_is_the_top_of_what_was_told(make):
    """After a whole run, best(n) is the n highest told scores among final-shape candidates."""
    fitness = SyntheticFitness(LAYERS, EXPERTS, KEEP, seed=4)
    strategy = make(seed=2)
    drive(strategy, fitness, random.Random(5), steps=400, max_batch=3, fail_prob=0.1)
    assert strategy.done
    told = {
        e.candidate.id: e.score
        for e in strategy.archive
        if not e.failed and e.candidate.keep_per_layer == [KEEP] * LAYERS
    }
    assert len(told) >= 5
    best = strategy.best(5)
    assert len(best) == 5
    for candidate, score in best:
        assert told[candidate.id] == score == fitness.score(candidate)
        assert candidate.keep_per_layer == [KEEP] * LAYERS
    assert [s for _, s in best] == sorted(told.values(), reverse=True)[:5]
    assert len({c.id for c, _ in best}) == 5


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_random_ask_sizes_and_tell_orders(make, seed):
    """Random n, random tell order, failures: invariants are checked inside `drive`."""
    fitness = SyntheticFitness(LAYERS, EXPERTS, KEEP, seed=seed)
    strategy = make(seed=seed)
    rng = random.Random(seed)
    in_flight: list[Candidate] = []
    drive(strategy, fitness, rng, steps=400, in_flight=in_flight, max_batch=7, fail_prob=0.2)
    assert strategy.done and not in_flight and not strategy.pending()
    assert strategy.ask(3) == []
    assert strategy.evaluations == len(strategy.archive)


def test_build_strategy_picks_the_class():
    assert isinstance(build_strategy(EEPSettings(keep=2), 2, 4), EEPStrategy)
    assert isinstance(build_strategy(RandomSearchSettings(keep=2), 2, 4), RandomSearch)
    start = Candidate.from_kept([[0, 1], [2, 3]], 4)
    cd = build_strategy(CoordinateDescentSettings(keep=2), 2, 4, init_from=[start])
    assert isinstance(cd, CoordinateDescent) and cd.ask(3)[0].phase == "init"
    with pytest.raises(ValueError, match="init_from"):
        build_strategy(RandomSearchSettings(keep=2), 2, 4, init_from=[start])


def test_load_state_dict_refuses_another_shape():
    state = _eep().state_dict()
    other = EEPStrategy(EEPSettings(keep=KEEP, groups=1), LAYERS, EXPERTS)
    with pytest.raises(ValueError, match="groups"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        _random().load_state_dict(state)


def test_keep_larger_than_the_model_is_refused():
    with pytest.raises(ValueError, match="keep=9 exceeds"):
        EEPStrategy(EEPSettings(keep=9), 2, 8)
