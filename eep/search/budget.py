"""Expert budgets: how many experts each MoE layer keeps.

Uniform (the EEP authors'): every layer keeps `keep`. Global: the layers keep k_l experts with
sum k_l = `total` and `low` <= k_l <= `high`; a search moves slots between layers. A layer that
keeps fewer experts than the model's top-k routes every token to all of them (see `Surgery`).

Every operator that changes an allocation goes through this module, so the budget holds by
construction: `random_allocation` draws one, `move_slot` moves one slot and `check` refuses any
allocation off the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


class BudgetError(ValueError):
    """A budget that cannot be met on this model, or an allocation off its budget."""


@dataclass(frozen=True)
class KeepBudget:
    """Total kept experts over `num_layers` layers, each layer within [low, high]."""

    total: int
    low: int
    high: int
    num_layers: int
    num_experts: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= self.num_experts:
            raise BudgetError(
                f"per-layer bounds keep_min={self.low}, keep_max={self.high} must satisfy "
                f"1 <= keep_min <= keep_max <= num_experts={self.num_experts}"
            )
        lo, hi = self.low * self.num_layers, self.high * self.num_layers
        if not lo <= self.total <= hi:
            raise BudgetError(
                f"a total of {self.total} kept experts cannot be split over {self.num_layers} "
                f"layers keeping {self.low}..{self.high} each (possible totals: {lo}..{hi})"
            )

    @classmethod
    def uniform(cls, keep: int, num_layers: int, num_experts: int) -> KeepBudget:
        """Every layer keeps `keep` experts."""
        return cls(keep * num_layers, keep, keep, num_layers, num_experts)

    @property
    def is_uniform(self) -> bool:
        """True when every layer must keep the same number of experts."""
        return self.low == self.high

    @property
    def mean(self) -> float:
        """Kept experts per layer on average."""
        return self.total / self.num_layers

    def describe(self) -> str:
        """One phrase for logs and tables."""
        if self.is_uniform:
            return f"keep {self.low}"
        return f"{self.total} experts over {self.num_layers} layers ({self.low}..{self.high} each)"

    def routing_refusal(self, routing) -> str | None:
        """Why this budget cannot be searched on a model routed by `routing` (None: it can).

        Grouped routing (DeepSeek) needs every layer's count to split into its expert groups;
        the operators here move single slots, so a global budget is refused there.
        """
        if self.is_uniform or not routing.grouped:
            return None
        return (
            f"a global budget (keep_min/keep_max/keep_total) moves single experts between layers, "
            f"but this model's grouped routing ({routing.topk_method}, n_group={routing.n_group}) "
            "needs every layer's count to be a multiple of n_group; use a uniform keep"
        )

    def check(self, keeps: Sequence[int], what: str = "candidate") -> None:
        """Raise BudgetError when an allocation breaks the budget (sum or bounds)."""
        keeps = list(keeps)
        if len(keeps) != self.num_layers:
            raise BudgetError(f"{what}: {len(keeps)} layers, expected {self.num_layers}")
        bad = [(layer, k) for layer, k in enumerate(keeps) if not self.low <= k <= self.high]
        if bad:
            layer, k = bad[0]
            raise BudgetError(
                f"{what}: layer {layer} keeps {k} experts, outside {self.low}..{self.high}"
            )
        if sum(keeps) != self.total:
            raise BudgetError(f"{what} keeps {sum(keeps)} experts in all, the budget is {self.total}")

    def even_allocation(self) -> list[int]:
        """As even as the total allows (the remainder to the last layers)."""
        base, extra = divmod(self.total, self.num_layers)
        return [base + (1 if layer >= self.num_layers - extra else 0) for layer in range(self.num_layers)]

    def random_allocation(self, rng: np.random.Generator) -> list[int]:
        """Every layer starts at `low`; the remaining slots go one by one to random layers with room."""
        keeps = [self.low] * self.num_layers
        for _ in range(self.total - self.low * self.num_layers):
            open_layers = [layer for layer, k in enumerate(keeps) if k < self.high]
            keeps[int(open_layers[rng.integers(len(open_layers))])] += 1
        return keeps

    def random_kept(self, rng: np.random.Generator) -> list[list[int]]:
        """A random pure pruning on the budget: a random allocation, then random sorted subsets."""
        return [
            sorted(int(e) for e in rng.choice(self.num_experts, size=k, replace=False))
            for k in self.random_allocation(rng)
        ]

    def allocate_by_scores(self, scores: torch.Tensor) -> list[list[int]]:
        """Kept experts per layer from per-expert scores [layers, E], ranked across layers.

        Scores are divided by their layer's sum (a layer's experts compete for its share), every
        layer first takes its `low` best, then the remaining slots go to the best remaining
        experts of any layer with room. Ties: lower layer, then lower expert index.
        """
        if tuple(scores.shape) != (self.num_layers, self.num_experts):
            raise BudgetError(
                f"scores of shape {tuple(scores.shape)}, expected {(self.num_layers, self.num_experts)}"
            )
        scores = scores.double().clamp(min=0)
        sums = scores.sum(dim=1, keepdim=True)
        share = torch.where(sums > 0, scores / torch.where(sums > 0, sums, 1.0), 1.0 / self.num_experts)
        order = [
            sorted(range(self.num_experts), key=lambda e, row=row: (-row[e], e))
            for row in share.tolist()
        ]
        kept = [ranked[: self.low] for ranked in order]
        rest = sorted(
            ((share[layer, e].item(), layer, e) for layer, ranked in enumerate(order) for e in ranked[self.low :]),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        left = self.total - self.low * self.num_layers
        for _, layer, e in rest:
            if left == 0:
                break
            if len(kept[layer]) < self.high:
                kept[layer].append(e)
                left -= 1
        out = [sorted(k) for k in kept]
        self.check([len(k) for k in out], "score allocation")
        return out


def move_slot(merge: Sequence[torch.Tensor], budget: KeepBudget, rng: np.random.Generator) -> list[torch.Tensor]:
    """One slot moves between layers: a random row of a layer above `low` goes, a random unkept
    expert of a layer below `high` comes in (pure-pruning rows). Unchanged when no move fits."""
    keeps = [int(m.shape[0]) for m in merge]
    donors = [layer for layer, k in enumerate(keeps) if k > budget.low]
    out = [m.clone() for m in merge]
    if not donors:
        return out
    donor = donors[int(rng.integers(len(donors)))]
    receivers = [layer for layer, k in enumerate(keeps) if k < budget.high and layer != donor]
    if not receivers:
        return out
    receiver = receivers[int(rng.integers(len(receivers)))]
    row = int(rng.integers(keeps[donor]))
    out[donor] = torch.cat([out[donor][:row], out[donor][row + 1 :]])
    kept = set(out[receiver].argmax(dim=1).tolist())
    free = [e for e in range(budget.num_experts) if e not in kept]
    new = torch.zeros(1, budget.num_experts, dtype=out[receiver].dtype)
    new[0, free[int(rng.integers(len(free)))]] = 1.0
    out[receiver] = torch.cat([out[receiver], new])
    return out
