"""The strategy registry: built-in entries, what an entry must satisfy, lookups."""

from __future__ import annotations

from typing import Literal

import pytest

from eep.search import EEPSettings, SearchSettings, build_strategy, registry
from eep.search.registry import Finalists, StrategyEntry


def test_builtin_kinds_and_their_summary_rows():
    rows = {kind: [(f.key, f.label) for f in registry.get(kind).finalists] for kind in registry.kinds()}
    assert rows == {
        "eep": [("eep_prune_only", "EEP prune-only"), ("eep", "EEP prune+merge")],
        "random": [("random_search", "random search")],
        "coordinate_descent": [("coordinate_descent", "coordinate descent")],
    }
    assert registry.get("eep").expected_evaluations(EEPSettings(keep=2, total_iter=7)) == 8
    assert registry.get("eep").chosen.key == "eep"


class _Settings(SearchSettings):
    kind: Literal["other"] = "other"


def _factory(*args):
    raise AssertionError("not built")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "mismatch"}, "kind must default to 'mismatch'"),
        ({"finalists": ()}, "finalists is empty"),
        ({"finalists": (Finalists("full", "x"),)}, "must be distinct and not"),
        ({"finalists": (Finalists("a", "x"), Finalists("a", "y"))}, "must be distinct"),
    ],
)
def test_an_entry_is_checked_when_made(kwargs, message):
    fields = {"kind": "other", "settings": _Settings, "factory": _factory,
              "finalists": (Finalists("other", "other"),)} | kwargs
    with pytest.raises(ValueError, match=message):
        StrategyEntry(**fields)


def test_registering_twice_and_unknown_kinds_are_errors():
    with pytest.raises(ValueError, match="'eep' is already registered"):
        registry.register(registry.get("eep"))
    with pytest.raises(ValueError, match="unknown strategy kind 'other'; the kinds are: .*eep"):
        build_strategy(_Settings(keep=2), 2, 4)
