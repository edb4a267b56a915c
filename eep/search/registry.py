"""The strategy registry: what the config, `build_strategy` and the campaign know of a strategy.

A strategy is one module (its settings, a `SearchSettings` subclass with a `kind` literal, and
its `BaseStrategy` subclass) plus one `register(StrategyEntry(...))` call in that module. Nothing
else names it: the campaign YAML's `strategy:` is validated by the settings class its `kind`
selects here, `build_strategy` calls the entry's factory, and the end of a campaign re-ranks on
dev each list of finalists the entry declares and reports each under its own label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import SerializeAsAny, WrapValidator

from eep.candidate import Candidate
from eep.search.base import BaseStrategy
from eep.search.settings import SearchSettings

# Summary keys that the end of a campaign writes itself; a strategy's methods cannot use them.
RESERVED_METHOD_KEYS = frozenset({"full", "random", "polish"})

Ranked = list[tuple[Candidate, float]]
Factory = Callable[[Any, int, int, int, str, Sequence[Candidate]], BaseStrategy]


def top_by_search(strategy: BaseStrategy, n: int) -> Ranked:
    """The strategy's `best(n)`: its top n final candidates by search score."""
    return strategy.best(n)


@dataclass(frozen=True)
class Finalists:
    """One list a strategy hands to the dev re-ranking, and the summary row its dev winner gets.

    `pick(strategy, n)` gives the top n (candidate, search score), best first. `phases`: the
    search-record phases this method's number of evaluations counts (None: all of them).
    """

    key: str
    label: str
    pick: Callable[[BaseStrategy, int], Ranked] = top_by_search
    phases: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StrategyEntry:
    """One strategy: its `kind`, settings class, factory, and the finalists it hands over.

    `factory(settings, num_layers, num_experts, seed, model_id, init_from)` builds it.
    `finalists` are re-ranked on dev in order; the dev winner of each list also competes in the
    lists after it, and the last list's winner is the campaign's choice (exported). EEP hands its
    pruning-phase archive ("prune-only"), then its whole archive ("prune+merge").
    `expected_evaluations(settings)` sizes the progress bar (None: unknown).
    """

    kind: str
    settings: type[SearchSettings]
    factory: Factory
    finalists: tuple[Finalists, ...]
    expected_evaluations: Callable[[Any], int | None] = lambda settings: None

    def __post_init__(self) -> None:
        field = self.settings.model_fields.get("kind")
        if field is None or field.default != self.kind:
            raise ValueError(
                f"strategy {self.kind!r}: {self.settings.__name__}.kind must default to {self.kind!r}"
            )
        keys = [f.key for f in self.finalists]
        if not keys:
            raise ValueError(f"strategy {self.kind!r}: finalists is empty")
        if len(set(keys)) != len(keys) or RESERVED_METHOD_KEYS & set(keys):
            raise ValueError(
                f"strategy {self.kind!r}: finalist keys {keys} must be distinct and not "
                f"{sorted(RESERVED_METHOD_KEYS)}"
            )

    @property
    def chosen(self) -> Finalists:
        """The list whose dev winner is the campaign's choice."""
        return self.finalists[-1]


_ENTRIES: dict[str, StrategyEntry] = {}


def register(entry: StrategyEntry, replace: bool = False) -> StrategyEntry:
    """Make `entry.kind` a strategy of campaign configs and `build_strategy`."""
    if entry.kind in _ENTRIES and not replace:
        raise ValueError(f"strategy kind {entry.kind!r} is already registered")
    _ENTRIES[entry.kind] = entry
    return entry


def unregister(kind: str) -> None:
    """Remove a registered kind (tests that register a toy strategy clean up with this)."""
    _ENTRIES.pop(kind, None)


def kinds() -> list[str]:
    """The registered strategy kinds, in registration order."""
    return list(_ENTRIES)


def get(kind: str) -> StrategyEntry:
    """The entry of `kind`; an unknown kind names the known ones."""
    try:
        return _ENTRIES[kind]
    except KeyError:
        raise ValueError(
            f"unknown strategy kind {kind!r}; the kinds are: {', '.join(_ENTRIES)}"
        ) from None


def entry_for(settings: SearchSettings) -> StrategyEntry:
    """The entry whose settings class `settings` is an instance of (by its `kind`)."""
    entry = get(getattr(settings, "kind", ""))
    if not isinstance(settings, entry.settings):
        raise TypeError(
            f"strategy {entry.kind!r} takes {entry.settings.__name__}, got {type(settings).__name__}"
        )
    return entry


def _validate_settings(value: Any, handler, info) -> SearchSettings:
    # Dispatch on `kind` at validation time (not a union fixed at import), so a strategy
    # registered later, e.g. by a plug-in or a test, is a valid `strategy:` too.
    if isinstance(value, SearchSettings):
        entry_for(value)
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with a `kind` ({', '.join(_ENTRIES)})")
    kind = value.get("kind")
    if kind is None:
        raise ValueError(f"`kind` is missing; the kinds are: {', '.join(_ENTRIES)}")
    return get(kind).settings.model_validate(value)


StrategySettings = Annotated[SerializeAsAny[SearchSettings], WrapValidator(_validate_settings)]
"""A strategy's settings, validated by the settings class its `kind` selects in the registry."""
