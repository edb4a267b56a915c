"""The ask/tell protocol every search strategy follows, and the base class that implements it.

A strategy proposes candidates (`ask`), learns their scores (`tell`, in any order), and can be
saved and restored exactly (`state_dict` / `load_state_dict`). Determinism contract: the same
seed and the same sequence of ask/tell calls give the same candidates, and a strategy restored
from a state dict continues exactly as the original would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

import torch

from eep.candidate import Candidate
from eep.result import FitnessResult
from eep.search.budget import BudgetError, KeepBudget
from eep.search.groups import LayerGroups
from eep.search.settings import SearchSettings
from eep.search.state import Evaluated, SearchState, dedup_key

STATE_FORMAT = 1


@runtime_checkable
class Strategy(Protocol):
    """What the campaign needs from a search strategy."""

    def ask(self, n: int) -> list[Candidate]:
        """Up to n new candidates (fewer, possibly none, when it must wait for results or is done)."""
        ...

    def tell(self, candidate: Candidate, result: FitnessResult) -> None:
        """Record the result of an asked candidate (any order; failures never become parents)."""
        ...

    @property
    def done(self) -> bool:
        """True when the strategy will ask for nothing more."""
        ...

    @property
    def evaluations(self) -> int:
        """Results told so far, failures included."""
        ...

    def best(self, n: int = 1) -> list[tuple[Candidate, float]]:
        """The n best final candidates by search score, best first."""
        ...

    def pending(self) -> list[Candidate]:
        """Candidates asked and not yet told, in the order they were asked."""
        ...

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (JSON types and torch tensors only)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict` into a strategy built with the same arguments."""
        ...


class BaseStrategy:
    """Shared machinery: ids, pending map, archive, dedup by content hash, one seeded generator.

    Subclasses implement `_propose` (one new candidate, or None to wait), `_capacity` (how many
    more may be asked now) and `_finished`, and may hook `_on_ask` / `_on_tell`.
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        settings: SearchSettings,
        num_layers: int,
        num_experts: int,
        seed: int = 0,
        model_id: str = "",
        id_prefix: str = "",
    ) -> None:
        if settings.keep is not None and settings.keep > num_experts:
            raise ValueError(f"keep={settings.keep} exceeds the model's num_experts={num_experts}")
        self.settings = settings
        self.budget: KeepBudget = settings.keep_budget(num_layers, num_experts)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.model_id = model_id
        self.groups = LayerGroups.resolve(settings.groups, num_layers)
        self._state = SearchState(seed, id_prefix or f"{self.kind}-")
        self._stalled = False

    # ----------------------------------------------------------------------------- protocol
    def ask(self, n: int) -> list[Candidate]:
        """Up to n new candidates, none identical to an archived or pending one."""
        if n < 0:
            raise ValueError(f"ask: n must be >= 0, got {n}")
        out: list[Candidate] = []
        while len(out) < n and not self.done and self._capacity() > 0:
            accepted = None
            proposal = None
            for _ in range(self.settings.max_duplicate_tries):
                proposal = self._propose()
                if proposal is None:
                    break
                key = dedup_key(proposal)
                if not self._state.is_known(key):
                    accepted = self._state.add_pending(proposal, key)
                    break
            if accepted is None:
                if proposal is not None and self._on_exhausted():
                    continue
                # Only new results can unblock a strategy that keeps proposing duplicates; with
                # nothing in flight none will come, so it stops instead of asking forever.
                if proposal is not None and not self._state.pending:
                    self._stalled = True
                break
            self._on_ask(accepted)
            out.append(accepted)
        return out

    def tell(self, candidate: Candidate, result: FitnessResult) -> None:
        """Archive the result of an asked candidate; a failed one never becomes a parent."""
        entry = self._state.resolve(candidate, result)
        self._on_tell(entry)

    @property
    def done(self) -> bool:
        """True when the strategy will ask for nothing more."""
        return self._stalled or self._finished()

    @property
    def evaluations(self) -> int:
        """Results told so far, failures included."""
        return len(self._state.archive)

    @property
    def phase(self) -> str:
        """The phase of the next candidate, for progress displays ("" if the strategy has none)."""
        return ""

    @property
    def archive(self) -> list[Evaluated]:
        """Every told result in the order it was told (read it, do not change it)."""
        return self._state.archive

    def pending(self) -> list[Candidate]:
        """Candidates asked and not yet told, in the order they were asked."""
        return list(self._state.pending.values())

    def best(self, n: int = 1) -> list[tuple[Candidate, float]]:
        """The n best final candidates by search score; ties keep the order they were told."""
        ranked = sorted(
            (e for e in self._state.successful() if self._eligible(e)),
            key=lambda e: -e.score,
        )
        return [(e.candidate, e.score) for e in ranked[:n]]

    def rejection_threshold(self, candidate: Candidate, finalists: int) -> float | None:
        """The score below which `candidate` can change nothing, or None: score it in full.

        Early rejection (eep.rejection) stops scoring a candidate whose bound falls below this.
        A strategy that needs every candidate's full score returns None (the default); one that
        only ranks returns the lowest score at which the candidate could still steer it or be
        one of the `finalists` best (the dev re-ranking). -inf (anything matters) also means None.
        """
        return None

    def _top_threshold(self, entries: Sequence[Evaluated], n: int) -> float:
        """The n-th best score of `entries` (-inf with fewer): what a newcomer must reach to rank."""
        scores = sorted((e.score for e in entries), reverse=True)
        return scores[n - 1] if len(scores) >= n else float("-inf")

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (JSON types and torch tensors only)."""
        return {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "keep": self._budget_spec(),
            "groups": self.groups.to_spec(),
            "settings": self.settings.model_dump(mode="json"),
            "search": self._state.state_dict(),
            "stalled": self._stalled,
            "strategy": self._strategy_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict`; the model shape, keep and groups must match.

        Other settings come from this object, so a resumed search may e.g. get a larger budget.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"strategy state format {state.get('format')!r}, expected {STATE_FORMAT}"
            )
        ours = {
            "kind": self.kind,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "keep": self._budget_spec(),
            "groups": self.groups.to_spec(),
        }
        for key, value in ours.items():
            if state.get(key) != value:
                raise ValueError(
                    f"strategy state has {key}={state.get(key)!r} but this strategy has {value!r}"
                )
        self._state.load_state_dict(state["search"])
        self._stalled = bool(state["stalled"])
        self._load_strategy_state(state["strategy"])

    # ----------------------------------------------------------------------------- hooks
    def _propose(self) -> Candidate | None:
        """One candidate to ask (its id is set later), or None when results must come first."""
        raise NotImplementedError

    def _capacity(self) -> int:
        """How many more candidates may be asked now (the budget minus told and pending)."""
        raise NotImplementedError

    def _finished(self) -> bool:
        """True when the search is over (budget spent or converged)."""
        raise NotImplementedError

    def _on_ask(self, candidate: Candidate) -> None:
        """Called for every candidate handed out by `ask`."""

    def _on_tell(self, entry: Evaluated) -> None:
        """Called after every told result."""

    def _on_exhausted(self) -> bool:
        """Every proposal was a duplicate; return True after switching to another way to propose."""
        return False

    def _eligible(self, entry: Evaluated) -> bool:
        """Whether an archived candidate may be returned by `best`."""
        return True

    def _strategy_state(self) -> dict:
        """The subclass's own state (JSON types and tensors)."""
        return {}

    def _load_strategy_state(self, state: dict) -> None:
        """Restore what `_strategy_state` returned."""

    # ----------------------------------------------------------------------------- helpers
    @property
    def _rng(self):  # numpy.random.Generator
        return self._state.rng

    def _used(self) -> int:
        """Candidates asked so far (told + pending)."""
        return len(self._state.archive) + len(self._state.pending)

    def _budget_spec(self) -> int | list[int]:
        """The budget as a state dict records it: keep (uniform) or [total, low, high]."""
        b = self.budget
        return b.low if b.is_uniform else [b.total, b.low, b.high]

    def _random_subset(self, keep: int | None = None) -> list[int]:
        """`keep` (default: the uniform keep) distinct experts drawn uniformly, sorted (the authors' init)."""
        keep = self.budget.low if keep is None else keep
        picked = self._rng.choice(self.num_experts, size=keep, replace=False)
        return sorted(int(e) for e in picked)

    def _random_pruning(self) -> list[torch.Tensor]:
        """One group matrix per group: random subsets, of a random allocation under a global budget."""
        if self.budget.is_uniform:
            return [self._one_hot(self._random_subset()) for _ in range(self.groups.num_groups)]
        return [self._one_hot(kept) for kept in self.budget.random_kept(self._rng)]

    def _one_hot(self, experts: Sequence[int]) -> torch.Tensor:
        """Pure-pruning rows: [len(experts), num_experts] identity rows."""
        return torch.eye(self.num_experts, dtype=torch.float32)[list(experts)]

    def _candidate(
        self,
        merge_groups: Sequence[torch.Tensor],
        router_groups: Sequence[torch.Tensor],
        phase: str,
        parents: Sequence[str] = (),
        **extra: object,
    ) -> Candidate:
        """A candidate from one merging and one router matrix per group."""
        return Candidate(
            router_map=self.groups.expand(router_groups),
            expert_merge=self.groups.expand(merge_groups),
            num_experts=self.num_experts,
            top_k=self.settings.top_k,
            router_mapping=self.settings.router_mapping,
            model_id=self.model_id,
            phase=phase,
            parents=tuple(parents),
            extra=dict(extra),
        )

    def _group_matrices(
        self, candidate: Candidate
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(merging, router) matrices per group of a candidate that is constant within groups."""
        label = candidate.id or "candidate"
        merge = self.groups.collapse(candidate.expert_merge, f"{label} expert_merge")
        router = self.groups.collapse(candidate.router_map, f"{label} router_map")
        return merge, router

    def _check_pure_pruning(self, candidate: Candidate, what: str) -> list[list[int]]:
        """Kept experts per group of a given pure-pruning candidate, sorted; clear errors if not."""
        label = f"{what} {candidate.id!r}" if candidate.id else what
        candidate.validate(num_layers=self.num_layers, num_experts=self.num_experts)
        if not candidate.is_pure_pruning():
            raise ValueError(f"{label} is not pure pruning (one-hot rows, R == M)")
        if self.budget.is_uniform:
            keeps = set(candidate.keep_per_layer)
            if keeps != {self.budget.low}:
                raise ValueError(
                    f"{label} keeps {sorted(keeps)} experts per layer, not {self.budget.low}"
                )
        else:
            try:
                self.budget.check(candidate.keep_per_layer, label)
            except BudgetError as exc:
                raise ValueError(f"{exc} ({self.budget.describe()})") from None
        kept = [sorted(experts) for experts in candidate.kept_experts()]
        out = []
        for g, layers in enumerate(self.groups.members):
            for layer in layers[1:]:
                if kept[layer] != kept[layers[0]]:
                    raise ValueError(
                        f"{label}: layers {layers[0]} and {layer} keep different experts but "
                        f"share group {g}; use groups: per_layer (or groups that match it)"
                    )
            out.append(kept[layers[0]])
        return out
