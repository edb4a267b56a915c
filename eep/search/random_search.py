"""The random-pruning baseline: i.i.d. random pure-pruning candidates under the ask/tell protocol."""

from __future__ import annotations

from collections.abc import Sequence

from eep.candidate import Candidate
from eep.search.base import BaseStrategy
from eep.search.registry import Finalists, StrategyEntry, register
from eep.search.settings import RandomSearchSettings


class RandomSearch(BaseStrategy):
    """Each group keeps `keep` experts drawn uniformly without replacement; `budget` evaluations."""

    kind = "random"

    def __init__(
        self,
        settings: RandomSearchSettings,
        num_layers: int,
        num_experts: int,
        seed: int = 0,
        model_id: str = "",
        id_prefix: str = "",
    ) -> None:
        super().__init__(settings, num_layers, num_experts, seed, model_id, id_prefix)
        self.settings: RandomSearchSettings = settings

    def _finished(self) -> bool:
        return self.evaluations >= self.settings.budget

    def _capacity(self) -> int:
        return self.settings.budget - self._used()

    def rejection_threshold(self, candidate: Candidate, finalists: int) -> float | None:
        """Only the `finalists` best matter: a candidate under the current n-th best is dropped."""
        threshold = self._top_threshold(self._state.successful(), finalists)
        return None if threshold == float("-inf") else threshold

    def _propose(self) -> Candidate:
        merge = self._random_pruning()
        return self._candidate(merge, [m.clone() for m in merge], "prune", operator="random")


def _build(
    settings: RandomSearchSettings,
    num_layers: int,
    num_experts: int,
    seed: int,
    model_id: str,
    init_from: Sequence[Candidate],
) -> RandomSearch:
    if init_from:
        raise ValueError("random search draws its own candidates; init_from is not used")
    return RandomSearch(settings, num_layers, num_experts, seed, model_id)


register(
    StrategyEntry(
        kind="random",
        settings=RandomSearchSettings,
        factory=_build,
        # "random" is the summary's key for the random-pruning baselines, hence random_search.
        finalists=(Finalists("random_search", "random search"),),
        expected_evaluations=lambda settings: settings.budget,
    )
)
