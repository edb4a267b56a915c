"""Search strategies under one ask/tell protocol: EEP, random pruning, coordinate descent."""

from __future__ import annotations

from collections.abc import Sequence

from eep.candidate import Candidate
from eep.search.base import BaseStrategy, Strategy
from eep.search.coordinate_descent import CoordinateDescent
from eep.search.eep import EEPStrategy
from eep.search.groups import GroupError, GroupSpec, LayerGroups
from eep.search.random_search import RandomSearch
from eep.search.settings import (
    CoordinateDescentSettings,
    EEPSettings,
    RandomSearchSettings,
    SearchSettings,
    StrategySettings,
)
from eep.search.state import Evaluated

__all__ = [
    "BaseStrategy",
    "CoordinateDescent",
    "CoordinateDescentSettings",
    "EEPSettings",
    "EEPStrategy",
    "Evaluated",
    "GroupError",
    "GroupSpec",
    "LayerGroups",
    "RandomSearch",
    "RandomSearchSettings",
    "SearchSettings",
    "Strategy",
    "StrategySettings",
    "build_strategy",
]


def build_strategy(
    settings: EEPSettings | RandomSearchSettings | CoordinateDescentSettings,
    num_layers: int,
    num_experts: int,
    seed: int = 0,
    model_id: str = "",
    init_from: Sequence[Candidate] = (),
) -> BaseStrategy:
    """The strategy its settings describe; `init_from` seeds EEP, or is coordinate descent's start.

    Coordinate descent takes at most one start candidate; random search takes none.
    """
    if isinstance(settings, EEPSettings):
        return EEPStrategy(settings, num_layers, num_experts, seed, model_id, init_from=init_from)
    if isinstance(settings, CoordinateDescentSettings):
        if len(init_from) > 1:
            raise ValueError(f"coordinate descent starts from one candidate, got {len(init_from)}")
        start = init_from[0] if init_from else None
        return CoordinateDescent(
            settings, num_layers, num_experts, seed, model_id, start_from=start
        )
    if isinstance(settings, RandomSearchSettings):
        if init_from:
            raise ValueError("random search draws its own candidates; init_from is not used")
        return RandomSearch(settings, num_layers, num_experts, seed, model_id)
    raise TypeError(f"unknown strategy settings {type(settings).__name__}")
