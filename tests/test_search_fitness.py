"""A synthetic fitness for the search tests (no model), and checks of the fitness itself.

Every layer has a hidden set of `keep` good experts and a hidden merging target: each good
expert's row is 0.8 of itself plus 0.2 of one other expert. The score rewards (a) how many good
experts a layer keeps (dominant expert of each row), (b) how close the matched rows of M and R
are to the merging target, so merging can beat the best pure pruning. Scores are rounded to
1/`levels`, like accuracy on `levels` examples, so that ties happen.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from eep.candidate import Candidate
from eep.result import FitnessResult
from eep.search.state import dedup_key


class SyntheticFitness:
    """score = 0.7 * mean kept-overlap + 0.3 * mean closeness to the merging target."""

    def __init__(
        self, num_layers: int, num_experts: int, keep: int, seed: int = 0, levels: int = 100
    ) -> None:
        rng = np.random.default_rng(seed)
        self.keep, self.levels = keep, levels
        self.targets: list[list[int]] = []
        self.merge_targets: list[dict[int, torch.Tensor]] = []
        self._rows: list[np.ndarray] = []  # [E, E]: row e = merging target of good expert e
        self._good: list[np.ndarray] = []  # [E] bool
        for _ in range(num_layers):
            good = sorted(int(e) for e in rng.choice(num_experts, keep, replace=False))
            rows = {}
            table = torch.zeros(num_experts, num_experts)
            for e in good:
                other = int(rng.choice([x for x in range(num_experts) if x != e]))
                table[e, e], table[e, other] = 0.8, 0.2
                rows[e] = table[e].clone()
            mask = torch.zeros(num_experts, dtype=torch.bool)
            mask[good] = True
            self.targets.append(good)
            self.merge_targets.append(rows)
            self._rows.append(table.numpy())
            self._good.append(mask.numpy())

    def score(self, candidate: Candidate) -> float:
        """The candidate's synthetic score in 0..1."""
        overlap, close = 0.0, 0.0
        for layer, (m, r) in enumerate(
            zip(candidate.expert_merge, candidate.router_map, strict=True)
        ):
            m, r = m.numpy(), r.numpy()
            dominant = m.argmax(axis=1)  # [keep]
            hit = self._good[layer][dominant]
            target = self._rows[layer][dominant]  # [keep, E]
            dist = ((m - target) ** 2).sum(axis=1) + ((r - target) ** 2).sum(axis=1)
            overlap += len(set(dominant[hit].tolist())) / self.keep
            close += float((np.exp(-dist / 2) * hit).sum()) / m.shape[0]
        layers = candidate.num_layers
        raw = 0.7 * overlap / layers + 0.3 * close / layers
        return round(raw * self.levels) / self.levels if self.levels else raw

    def __call__(self, candidate: Candidate) -> FitnessResult:
        return FitnessResult(score=self.score(candidate), metric="synthetic")


def test_target_pruning_scores_high_and_merging_scores_higher():
    fit = SyntheticFitness(num_layers=3, num_experts=8, keep=4, seed=1, levels=0)
    best_prune = Candidate.from_kept(fit.targets, 8)
    worst = Candidate.from_kept([[e for e in range(8) if e not in t] for t in fit.targets], 8)
    merged = [torch.stack([fit.merge_targets[i][e] for e in t]) for i, t in enumerate(fit.targets)]
    best_merge = Candidate(
        router_map=merged, expert_merge=[m.clone() for m in merged], num_experts=8
    )
    assert fit.score(worst) == 0.0
    assert 0.95 < fit.score(best_prune) < 1.0
    assert fit.score(best_merge) == pytest.approx(1.0)


def test_scores_are_rounded_to_levels():
    fit = SyntheticFitness(num_layers=2, num_experts=8, keep=2, seed=0, levels=10)
    c = Candidate.random_pruning(2, 8, 2, generator=3)
    assert fit.score(c) * 10 == round(fit.score(c) * 10)


def drive(
    strategy,
    fitness,
    rng: random.Random,
    steps: int,
    in_flight: list[Candidate] | None = None,
    max_batch: int = 4,
    fail_prob: float = 0.0,
    external_parents: frozenset[str] = frozenset(),
) -> list[Candidate]:
    """Random-size asks and random-order tells, checking the protocol's invariants on the way.

    `in_flight` (asked, not told) is carried between calls so a run can be split and resumed.
    Returns the candidates asked, in order.
    """
    in_flight = in_flight if in_flight is not None else []
    seen_ids = {c.id for c in strategy.pending()} | {e.candidate.id for e in strategy.archive}
    seen_hashes = {dedup_key(c) for c in strategy.pending()}
    seen_hashes |= {dedup_key(e.candidate) for e in strategy.archive}
    succeeded = {e.candidate.id for e in strategy.archive if not e.failed}
    asked: list[Candidate] = []
    for _ in range(steps):
        if strategy.done and not in_flight:
            break
        n = rng.randint(0, max_batch)
        batch = strategy.ask(n)
        assert len(batch) <= n
        for c in batch:
            assert c.id and c.id not in seen_ids, f"id {c.id!r} repeats"
            assert dedup_key(c) not in seen_hashes, f"{c.id} repeats an asked candidate"
            assert c.phase, "every candidate names its phase"
            assert set(c.parents) <= succeeded | external_parents, (
                f"{c.id} has parents {c.parents} that were not successfully evaluated"
            )
            seen_ids.add(c.id)
            seen_hashes.add(dedup_key(c))
        asked += batch
        in_flight += batch
        if n > 0 and not batch and not in_flight:
            assert strategy.done, "strategy asks for nothing, has nothing pending, is not done"
        rng.shuffle(in_flight)
        for _ in range(rng.randint(0 if batch else 1, len(in_flight)) if in_flight else 0):
            c = in_flight.pop()
            failed = rng.random() < fail_prob
            strategy.tell(c, FitnessResult.failure("synthetic failure") if failed else fitness(c))
            if not failed:
                succeeded.add(c.id)
    return asked


def run_to_end(strategy, fitness, batch: int = 4) -> None:
    """Ask `batch`, tell all in order, until done."""
    while not strategy.done:
        candidates = strategy.ask(batch)
        assert candidates or strategy.done, "no candidates and nothing pending"
        for c in candidates:
            strategy.tell(c, fitness(c))
