"""Teacher-forced fitness kinds and early rejection, against hand computations on the built-in model."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from eep.candidate import Candidate
from eep.config import ConfigError, config_from_dict
from eep.fitness import Evaluator, encode_choice
from eep.forced import gold_continuation
from eep.models.loading import load_model
from eep.rejection import RejectionRule
from eep.result import FitnessResult
from eep.search.eep import EEPStrategy, _pool_threshold, absolute_pool_end
from eep.search.settings import EEPSettings

N = 8


@pytest.fixture(scope="module")
def loaded():
    return load_model("builtin:tiny-moe", "cpu", "float32")


@pytest.fixture(scope="module")
def pruned(loaded):
    # A bad pruning, so the candidate's distributions differ clearly from the full model's.
    return Candidate.random_pruning(4, 8, 2, generator=3)


def rows(loaded, task, n=N):
    """(context ids, gold ids) of the first n search examples, one example at a time."""
    evaluator = Evaluator(loaded, task, "search", max_examples=n)
    return [encode_choice(loaded.tokenizer, ex.prompt, gold_continuation(ex)) for ex in evaluator.examples]


def logprobs_of(loaded, ids) -> torch.Tensor:
    """log-softmax of one unpadded row's logits [len, V], in float64."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("task", ["add", "compare"])
def test_likelihood_is_the_mean_gold_token_logprob(loaded, pruned, task):
    evaluator = Evaluator(loaded, task, "search", max_examples=N, fitness="likelihood", batch_size=3)
    result = evaluator.evaluate(pruned)
    expected = []
    for context, gold in rows(loaded, task):
        lp = logprobs_of(loaded, context + gold)  # the candidate is still applied
        picks = [lp[len(context) - 1 + i, t] for i, t in enumerate(gold)]
        expected.append(float(sum(picks) / len(picks)))
    assert result.metric == "loglik" and result.fitness == "likelihood"
    np.testing.assert_allclose(result.hits, expected, atol=2e-4)
    assert result.score == pytest.approx(statistics.fmean(expected), abs=2e-4)
    assert result.score < -0.05  # a bad pruning is far from certain of the answer


@pytest.mark.parametrize("top", [1000, 3])
def test_kl_against_the_full_model_by_hand(loaded, pruned, top):
    task = "add"
    evaluator = Evaluator(loaded, task, "search", max_examples=N, fitness="kl", kl_top=top, batch_size=4)
    full = evaluator.evaluate(None)
    assert full.hits == pytest.approx([0.0] * N, abs=1e-6)  # the full model against itself
    result = evaluator.evaluate(pruned)
    expected = []
    for context, gold in rows(loaded, task):
        ids = context + gold
        q = logprobs_of(loaded, ids)[:-1]  # candidate applied
        evaluator.surgery.restore()
        p = logprobs_of(loaded, ids)[:-1]
        evaluator.surgery.apply(pruned)
        if top >= p.shape[-1]:
            kl = (p.exp() * (p - q)).sum(-1)
        else:  # coarsened: the full model's top tokens and one bucket for the rest
            index = p.topk(top, dim=-1).indices
            pt, qt = p.gather(-1, index), q.gather(-1, index)
            p_rest = 1 - pt.exp().sum(-1)
            q_rest = 1 - qt.exp().sum(-1)
            kl = (pt.exp() * (pt - qt)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        expected.append(-float(kl.mean()))
    assert result.metric == "neg_kl"
    np.testing.assert_allclose(result.hits, expected, atol=2e-4, rtol=1e-3)
    assert result.score < -0.05


def test_coarsened_kl_is_a_lower_bound_of_the_full_kl(loaded, pruned):
    exact = Evaluator(loaded, "sort", "search", max_examples=N, fitness="kl", kl_top=1000).evaluate(pruned)
    coarse = Evaluator(loaded, "sort", "search", max_examples=N, fitness="kl", kl_top=2).evaluate(pruned)
    assert all(c >= e - 1e-6 for c, e in zip(coarse.hits, exact.hits, strict=True))  # -KL: higher
    assert coarse.score > exact.score


def test_forced_fitness_does_not_generate(loaded, pruned):
    accuracy = Evaluator(loaded, "add", "search", max_examples=N).evaluate(pruned)
    forced = Evaluator(loaded, "add", "search", max_examples=N, fitness="likelihood").evaluate(pruned)
    # Exactly the prompt + gold tokens, once; generation processes the prompts plus new tokens.
    gold_tokens = sum(len(c) + len(g) for c, g in rows(loaded, "add"))
    assert forced.tokens == gold_tokens
    assert accuracy.tokens != gold_tokens


def test_unknown_fitness_kind_is_refused(loaded):
    with pytest.raises(ValueError, match="fitness must be one of accuracy, likelihood, kl"):
        Evaluator(loaded, "add", "search", fitness="perplexity")


# ---------------------------------------------------------------------------------- rejection
def test_wilson_bound_values():
    rule = RejectionRule(confidence=0.95, slice=4)
    assert rule.upper_bound([1.0] * 10, 10) == 1.0
    assert rule.upper_bound([0.0, 1.0], 2) == 0.5  # everything seen: the mean itself
    # 16 misses of 64: the unseen 48 are bounded by Wilson's 0.95 upper bound at p=0, n=16.
    z = statistics.NormalDist().inv_cdf(0.95)
    wilson = (z * z / 32 + z * math.sqrt(z * z / (4 * 256))) / (1 + z * z / 16)
    assert rule.upper_bound([0.0] * 16, 64) == pytest.approx(wilson * 48 / 64)
    # Unbounded hits (log-likelihoods): mean + z sd / sqrt(n) for the unseen part.
    hits = [-1.0, -2.0, -3.0, -2.0]
    unseen = -2.0 + z * statistics.stdev(hits) / 2
    assert rule.upper_bound(hits, 8) == pytest.approx((-8.0 + 4 * unseen) / 8)


@pytest.mark.parametrize("fitness", ["accuracy", "likelihood"])
def test_rejection_stops_at_a_slice_and_never_without_a_threshold(loaded, pruned, fitness):
    rule = RejectionRule(confidence=0.9, slice=4)
    evaluator = Evaluator(loaded, "add", "search", max_examples=32, fitness=fitness, rejection=rule, batch_size=3)
    plain = Evaluator(loaded, "add", "search", max_examples=32, fitness=fitness).evaluate(pruned)
    whole = evaluator.evaluate(pruned)  # no threshold: every example, the same score
    assert not whole.rejected and whole.count == 32 and whole.score == pytest.approx(plain.score, abs=1e-5)
    stopped = evaluator.evaluate(pruned, reject_below=plain.score + 0.5)
    assert stopped.rejected and stopped.count in (4, 8, 16)  # checks after 4, 8, 16 of 32
    assert stopped.bound < plain.score + 0.5 and stopped.total == 32
    kept = evaluator.evaluate(pruned, reject_below=plain.score - 0.5)
    assert not kept.rejected and kept.count == 32


def test_rejection_slices_are_a_fixed_random_sample_that_doubles(loaded):
    evaluator = Evaluator(loaded, "add", "search", max_examples=40, rejection=RejectionRule(slice=8))
    sizes: dict[int, list[int]] = {}
    for batch in evaluator._batches:
        sizes.setdefault(batch.slice, []).extend(item.index for item in batch.items)
    assert [len(sizes[k]) for k in sorted(sizes)] == [8, 8, 16, 8]  # checks after 8, 16, 32
    assert sorted(sizes[0]) != list(range(8))  # a random sample, not the split's first examples


# ---------------------------------------------------------------------------------- strategies
def eep(**overrides) -> EEPStrategy:
    settings = EEPSettings(keep=2, init_population=4, discrete_iter=20, total_iter=40, **overrides)
    return EEPStrategy(settings, num_layers=2, num_experts=6, seed=0)


def test_a_rejected_candidate_never_enters_the_top_or_becomes_a_parent():
    strategy = eep()
    scores = iter([0.5, 0.4, 0.3, 0.2])
    for candidate in strategy.ask(4):
        strategy.tell(candidate, FitnessResult(score=next(scores), metric="m", count=8, total=8))
    [child] = strategy.ask(1)
    # A partial score above everything: it must still be neither best nor a parent.
    strategy.tell(child, FitnessResult(score=0.99, metric="m", count=2, total=8, rejected=True))
    assert child.id not in {c.id for c, _ in strategy.best(10)}
    for _ in range(20):
        for c in strategy.ask(1):
            assert child.id not in c.parents
            strategy.tell(c, FitnessResult(score=0.1, metric="m", count=8, total=8))
    assert strategy.ask(0) == [] and child.id not in {c.id for c, _ in strategy.best(100)}


@pytest.mark.parametrize("select_type", ["absolute", "ranking"])
@pytest.mark.parametrize("inclusive", [True, False])
def test_pool_threshold_is_conservative(select_type, inclusive):
    # A newcomer below the threshold never lands in the pool the selection code computes.
    rng = np.random.default_rng(0)
    for _ in range(300):
        scores = sorted(rng.choice([0.1, 0.2, 0.3, 0.5, 0.8], size=int(rng.integers(1, 12))).tolist(), reverse=True)
        threshold, rank = float(rng.choice([0.05, 0.15, 0.4])), int(rng.integers(0, 6))
        bar = _pool_threshold(scores, select_type, threshold, rank, inclusive)
        for newcomer in np.linspace(0.0, 0.9, 19):
            if not newcomer < bar:
                continue
            merged = sorted([*scores, float(newcomer)], reverse=True)
            position = len(merged) - 1 - merged[::-1].index(newcomer)  # ties: newcomer last
            if select_type == "ranking":
                end = rank
            else:
                end = max(absolute_pool_end(merged, threshold), rank)
            size = end + 1 if inclusive else end
            assert position >= size, (scores, threshold, rank, newcomer, bar)


def test_random_search_threshold_is_the_nth_best():
    from eep.search.random_search import RandomSearch
    from eep.search.settings import RandomSearchSettings

    strategy = RandomSearch(RandomSearchSettings(keep=2, budget=10), num_layers=2, num_experts=6)
    asked = strategy.ask(4)
    assert strategy.rejection_threshold(asked[0], 2) is None  # nothing told yet: anything matters
    for c, s in zip(asked, [0.3, 0.9, 0.5, 0.1], strict=True):
        strategy.tell(c, FitnessResult(score=s, metric="m"))
    assert strategy.rejection_threshold(asked[0], 2) == 0.5


# ---------------------------------------------------------------------------------- config
def config(**extra) -> dict:
    return {"model": "builtin:tiny-moe", "task": "add", "keep": 4, "strategy": "eep", **extra}


def test_fitness_config_shorthand_and_errors():
    assert config_from_dict(config(fitness="kl")).fitness.kind == "kl"
    with_rejection = config_from_dict(config(fitness={"kind": "likelihood", "early_rejection": {"slice": 8}}))
    assert with_rejection.fitness.early_rejection.slice == 8
    with pytest.raises(ConfigError, match=r"fitness\.kind: Input should be 'accuracy', 'likelihood' or 'kl'"):
        config_from_dict(config(fitness="perplexity"))
    with pytest.raises(ConfigError, match=r"fitness\.early_rejection\.confidence"):
        config_from_dict(config(fitness={"early_rejection": {"confidence": 1.5}}))
    task = {"name": "add", "source": {"kind": "builtin", "name": "add"}, "scorer": "generate",
            "search_metric": "char_similarity"}
    with pytest.raises(ConfigError, match="both say what the search maximises"):
        config_from_dict(config(task=task, fitness="likelihood"))
