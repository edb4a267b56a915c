"""The random-pruning baseline: i.i.d. random pure-pruning candidates under the ask/tell protocol."""

from __future__ import annotations

from eep.candidate import Candidate
from eep.search.base import BaseStrategy
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

    def _propose(self) -> Candidate:
        merge = [self._one_hot(self._random_subset()) for _ in range(self.groups.num_groups)]
        return self._candidate(merge, [m.clone() for m in merge], "prune", operator="random")
