"""The end of a campaign: dev re-ranking of each list of finalists, then test scores.

Each list of finalists the strategy's registry entry declares (its top `final.dev_top` by search
score) is scored on `dev`; the best on dev wins the list (ties: the better search score), and
also competes in the lists after it. Then the full model, every list's winner and
`final.random_baselines` random pure-pruning candidates are scored on `test`. A candidate is
scored at most once per split (keyed by content hash): records already in `evaluations.jsonl`
(a resumed end phase) are reused, and two lists that pick the same candidate share its record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eep.candidate import Candidate
from eep.distributed.pool import EvaluatorPool, Job
from eep.metrics import CampaignMetrics
from eep.records import FULL_ID, evaluation_record
from eep.runlog import RunLog
from eep.search.base import BaseStrategy
from eep.search.budget import KeepBudget
from eep.search.registry import Ranked, StrategyEntry
from eep.summary import FULL_KEY, FULL_LABEL, RANDOM_KEY, RANDOM_LABEL

log = logging.getLogger(__name__)
NO_CANDIDATE_NOTE = "no complete candidate within the budget (every layer pruned)"
_BASELINE_SEED_OFFSET = 1_000_003  # baselines get their own stream, apart from the search's seed


class SplitScorer:
    """Scores candidates on a split through the pool, once per (split, content hash)."""

    def __init__(
        self, runlog: RunLog, pool: Callable[[], EvaluatorPool], metrics: CampaignMetrics
    ) -> None:
        self.runlog, self._pool, self.metrics = runlog, pool, metrics
        self._scores: dict[tuple[str, str], float] = {
            (r["split"], r["hash"]): r["score"]
            for r in runlog.records
            if r["split"] != "search" and not r.get("error")
        }
        self.submitted = 0  # jobs sent to the pool (tests count them)

    def score(self, items: Sequence[tuple[str, Candidate | None]], split: str) -> dict[str, float]:
        """Score on `split` by item id (`None` candidate: the full model), scoring new hashes only."""
        hashes = {
            item_id: candidate.content_hash() if candidate is not None else FULL_ID
            for item_id, candidate in items
        }
        todo: dict[str, tuple[str, Candidate | None]] = {}
        for item_id, candidate in items:
            content_hash = hashes[item_id]
            if (split, content_hash) not in self._scores and content_hash not in todo:
                todo[content_hash] = (item_id, candidate)
        if todo:
            self._run(todo, split)
        return {item_id: self._scores[(split, content_hash)] for item_id, content_hash in hashes.items()}

    def _run(self, todo: dict[str, tuple[str, Candidate | None]], split: str) -> None:
        pool = self._pool()
        by_job: dict[int, str] = {}
        for content_hash, (_, candidate) in todo.items():
            job = Job(candidate, split)
            by_job[id(job)] = content_hash
            pool.submit(job)
            self.submitted += 1
        while pool.in_flight:
            for job in pool.wait():
                content_hash = by_job[id(job)]
                item_id, candidate = todo[content_hash]
                if candidate is not None:
                    self.runlog.save_candidate(candidate)
                record = evaluation_record(item_id, candidate, job.result, job.worker, content_hash)
                self.runlog.append(record)
                self.metrics.observe(record, workers=pool.size)
                self._scores[(split, content_hash)] = job.result.score


@dataclass
class Finale:
    """What the end of a campaign found: summary rows by method key, and the chosen candidate."""

    methods: dict[str, dict]
    chosen_key: str
    chosen: Candidate | None


def choose_on_dev(ranked: Ranked, scorer: SplitScorer) -> tuple[Candidate, float, float]:
    """The best of `ranked` on dev (ties: the better search score, i.e. the earlier one)."""
    dev = scorer.score([(c.id, c) for c, _ in ranked], "dev")
    best_candidate, best_search = ranked[0]
    best_dev = -math.inf
    for candidate, search_score in ranked:
        score = dev[candidate.id]
        if not math.isnan(score) and score > best_dev:
            best_candidate, best_search, best_dev = candidate, search_score, score
    return best_candidate, best_search, best_dev


def random_baselines(
    count: int, budget: KeepBudget, top_k: int | None, seed: int, model: str
) -> list[Candidate]:
    """The random pure-pruning candidates scored on test as the random-pruning reference.

    Under a global budget each baseline also draws its per-layer counts at random.
    """
    generator = torch.Generator().manual_seed(seed + _BASELINE_SEED_OFFSET)
    meta = {"top_k": top_k, "phase": "baseline", "model_id": model}
    if budget.is_uniform:
        return [
            Candidate.random_pruning(
                budget.num_layers, budget.num_experts, budget.low, generator,
                id=f"random-baseline-{i:02d}", **meta,
            )
            for i in range(count)
        ]
    rng = np.random.default_rng(seed + _BASELINE_SEED_OFFSET)
    return [
        Candidate.from_kept(budget.random_kept(rng), budget.num_experts, id=f"random-baseline-{i:02d}", **meta)
        for i in range(count)
    ]


def run_finale(
    strategy: BaseStrategy,
    entry: StrategyEntry,
    scorer: SplitScorer,
    dev_top: int,
    search_records: Sequence[dict],
    baselines: Sequence[Candidate],
) -> Finale:
    """Dev re-ranking of every list of finalists, then the test scores (see the module docstring)."""
    found: dict[str, dict] = {}
    winners: dict[str, tuple[Candidate, float]] = {}
    for finalists in entry.finalists:
        ranked = finalists.pick(strategy, dev_top)
        ids = {c.id for c, _ in ranked}
        # Earlier winners stay in the running: after EEP's merging phase its top by search score
        # can be all merged candidates that overfit the search split.
        ranked += [w for w in winners.values() if w[0].id not in ids]
        phases = finalists.phases
        evaluations = sum(1 for r in search_records if phases is None or r.get("phase") in phases)
        row = {"label": finalists.label, "row": "search"}
        if not ranked:
            found[finalists.key] = {**row, "evaluations": evaluations, "note": NO_CANDIDATE_NOTE}
            log.warning("%s: %s", finalists.key, NO_CANDIDATE_NOTE)
            continue
        best, search_score, dev_score = choose_on_dev(ranked, scorer)
        winners[finalists.key] = (best, search_score)
        found[finalists.key] = {
            **row, "id": best.id, "search": search_score, "dev": dev_score, "evaluations": evaluations,
        }

    items: list[tuple[str, Candidate | None]] = [(FULL_ID, None)]
    items += [(c.id, c) for c, _ in winners.values()]
    items += [(c.id, c) for c in baselines]
    test = scorer.score(items, "test")

    methods: dict[str, dict] = {
        FULL_KEY: {"label": FULL_LABEL, "row": "reference", "test": test[FULL_ID], "evaluations": 0}
    }
    if baselines:
        scores = [test[c.id] for c in baselines]
        methods[RANDOM_KEY] = {
            "label": RANDOM_LABEL, "row": "baseline",
            "test": sum(scores) / len(scores), "scores": scores, "evaluations": len(baselines),
        }
    for key, row in found.items():
        if key in winners:
            row["test"] = test[winners[key][0].id]
        methods[key] = row
    chosen = winners.get(entry.chosen.key)
    return Finale(methods, entry.chosen.key, chosen[0] if chosen else None)
