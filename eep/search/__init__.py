"""Search strategies under one ask/tell protocol: EEP, random pruning, coordinate descent.

Each strategy module registers itself (`eep.search.registry`); importing this package imports the
built-in ones, so their kinds are known to configs and `build_strategy`.
"""

from __future__ import annotations

from collections.abc import Sequence

from eep.candidate import Candidate
from eep.search import registry
from eep.search.base import BaseStrategy, Strategy
from eep.search.coordinate_descent import CoordinateDescent
from eep.search.eep import EEPStrategy
from eep.search.groups import GroupError, GroupSpec, LayerGroups
from eep.search.random_search import RandomSearch
from eep.search.registry import Finalists, StrategyEntry, StrategySettings, register
from eep.search.settings import (
    CoordinateDescentSettings,
    EEPSettings,
    RandomSearchSettings,
    SearchSettings,
)
from eep.search.state import Evaluated

__all__ = [
    "BaseStrategy",
    "CoordinateDescent",
    "CoordinateDescentSettings",
    "EEPSettings",
    "EEPStrategy",
    "Evaluated",
    "Finalists",
    "GroupError",
    "GroupSpec",
    "LayerGroups",
    "RandomSearch",
    "RandomSearchSettings",
    "SearchSettings",
    "Strategy",
    "StrategyEntry",
    "StrategySettings",
    "build_strategy",
    "register",
    "registry",
]


def build_strategy(
    settings: SearchSettings,
    num_layers: int,
    num_experts: int,
    seed: int = 0,
    model_id: str = "",
    init_from: Sequence[Candidate] = (),
) -> BaseStrategy:
    """The strategy its settings' `kind` registers; `init_from` seeds it (each kind says how).

    EEP takes any number of seeds, coordinate descent at most one start, random search none.
    """
    entry = registry.entry_for(settings)
    return entry.factory(settings, num_layers, num_experts, seed, model_id, tuple(init_from))
