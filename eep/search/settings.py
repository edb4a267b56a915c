"""Settings of the search strategies (pydantic, `extra="forbid"`), one model per strategy.

Scores and score thresholds are in the units of `FitnessResult.score` (0..1 for accuracy). The
EEP authors' thresholds are in OpenCompass metric points (percent): 1.0 point = 0.01 here, so
their `parents_threshold` 1.0 / 3.0 are our 0.01 / 0.03.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from eep.search.budget import BudgetError, KeepBudget
from eep.search.groups import GroupError, LayerGroups

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
GroupsField = Union[Literal["per_layer"], Annotated[int, Field(ge=1)], list[tuple[int, int]]]  # noqa: UP007
SelectType = Literal["absolute", "ranking"]


class SearchSettings(BaseModel):
    """What every strategy searches: the budget per layer, routing, and layer groups."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: int | None = Field(
        default=None, ge=1,
        description="experts kept per MoE layer (k, the authors' budget); with keep_min/keep_max "
        "the average of a global budget",
    )
    keep_total: int | None = Field(
        default=None, ge=1, description="global budget: experts kept over all MoE layers (instead of keep)"
    )
    keep_min: int | None = Field(
        default=None, ge=1, description="global budget: fewest experts a layer keeps (default 1)"
    )
    keep_max: int | None = Field(
        default=None, ge=1, description="global budget: most experts a layer keeps (default all)"
    )
    top_k: int | None = Field(
        default=None, ge=1, description="active experts per token; None keeps the model's"
    )
    router_mapping: Literal["probs", "logits"] = Field(
        default="probs", description="router mapping: R on post-softmax probabilities, or R @ G"
    )
    groups: GroupsField = Field(
        default="per_layer",
        description="layers sharing matrices: per_layer, N equal groups, or [[first, last], ...]",
    )
    max_duplicate_tries: int = Field(
        default=100,
        ge=1,
        description="proposals tried per asked candidate before giving up on dedup",
    )

    @model_validator(mode="after")
    def _check(self) -> SearchSettings:
        if (self.keep is None) == (self.keep_total is None):
            raise ValueError(
                "give keep (experts per layer) or keep_total (experts over all layers), one of them"
            )
        if self.keep_min is not None and self.keep_max is not None and self.keep_min > self.keep_max:
            raise ValueError(f"keep_min={self.keep_min} exceeds keep_max={self.keep_max}")
        if self.global_budget:
            if self.groups != "per_layer":
                raise ValueError(
                    "a global budget (keep_total, keep_min, keep_max) moves experts between single "
                    f"layers: use groups: per_layer, not {self.groups!r}"
                )
            if self.keep is not None and not (self.keep_min or 1) <= self.keep <= (self.keep_max or self.keep):
                raise ValueError(
                    f"keep={self.keep} (the average) must lie within keep_min..keep_max"
                )
        elif self.top_k is not None and self.top_k > self.keep:
            raise ValueError(f"top_k={self.top_k} exceeds keep={self.keep}")
        if isinstance(self.groups, list):
            # Range shape only; coverage needs the model's layer count (checked at construction).
            try:
                LayerGroups.resolve(self.groups, max(last for _, last in self.groups) + 1)
            except (GroupError, ValueError) as exc:
                raise ValueError(f"groups: {exc}") from exc
        return self


    @property
    def global_budget(self) -> bool:
        """True when layers may keep different numbers of experts (a global budget)."""
        if self.keep_total is not None:
            return True
        return any(b is not None and b != self.keep for b in (self.keep_min, self.keep_max))

    def keep_budget(self, num_layers: int, num_experts: int) -> KeepBudget:
        """The budget on a model of `num_layers` MoE layers of `num_experts` experts."""
        if not self.global_budget:
            assert self.keep is not None
            return KeepBudget.uniform(self.keep, num_layers, num_experts)
        total = self.keep_total if self.keep_total is not None else self.keep * num_layers
        given = ", ".join(f"{name}={getattr(self, name)}" for name in ("keep", "keep_total", "keep_min", "keep_max")
                          if getattr(self, name) is not None)
        try:
            return KeepBudget(total, self.keep_min or 1, self.keep_max or num_experts, num_layers, num_experts)
        except BudgetError as exc:
            raise BudgetError(f"{given}: {exc}") from None


class EEPSettings(SearchSettings):
    """EEP's evolutionary search (Liu et al. 2024), with the authors' defaults."""

    kind: Literal["eep"] = Field(default="eep", description="strategy name in configs")
    init_population: int = Field(
        default=31, ge=1, description="random pure-pruning inits (authors: max_init_num 30 ran 31)"
    )
    discrete_iter: int = Field(
        default=100, ge=0, description="evaluations after which the continuous merging phase starts"
    )
    total_iter: int = Field(
        default=400,
        ge=0,
        description="evaluations after which the search stops (total_iter + 1 run)",
    )
    discrete_mutate_prob: Probability = Field(
        default=0.15, description="per-row probability of re-picking a kept expert (pruning phase)"
    )
    crossover_prob: Probability = Field(
        default=0.3, description="probability a merging-phase child is bred by crossover"
    )
    crossover_parents_select_type: SelectType = Field(
        default="absolute", description="crossover pool: score gap to the best, or top ranks"
    )
    crossover_parents_threshold: float = Field(
        default=0.01,
        ge=0.0,
        description="crossover pool score gap, score units (authors: 1.0 point)",
    )
    crossover_parents_rank: int = Field(
        default=6, ge=0, description="minimum crossover pool size (absolute) or pool size (ranking)"
    )
    from_front_prob: Probability = Field(
        default=0.6, description="probability a row/matrix comes from the first-drawn parent"
    )
    mutate_parents_select_type: SelectType = Field(
        default="absolute", description="mutation parent pool: score gap to the best, or top ranks"
    )
    mutate_parents_threshold: float = Field(
        default=0.03,
        ge=0.0,
        description="mutation pool score gap, score units (authors: 3.0 points)",
    )
    mutate_parents_rank: int = Field(
        default=0,
        ge=0,
        description="minimum pool end index (absolute) or last pool index (ranking)",
    )
    mutate_prob: Probability = Field(
        default=0.25, description="per-entry probability of a Gaussian perturbation (merging phase)"
    )
    mutate_scale: float = Field(
        default=0.065, ge=0.0, description="standard deviation of the Gaussian perturbation"
    )
    norm_prob: Probability = Field(
        default=0.1, description="probability a child's merging rows are divided by their sums"
    )
    weight_change_prob: Probability = Field(
        default=0.25, description="per-group probability that a merging matrix is changed"
    )
    transfer_change_prob: Probability = Field(
        default=0.25, description="per-group probability that a router-mapping matrix is changed"
    )
    slot_move_prob: Probability = Field(
        default=0.3,
        description="global budget: probability a pruning-phase child moves one kept slot between layers",
    )
    @model_validator(mode="after")
    def _check_flags(self) -> EEPSettings:
        if self.weight_change_prob == 0 and self.transfer_change_prob == 0:
            raise ValueError(
                "weight_change_prob and transfer_change_prob are both 0: no group could ever change"
            )
        return self


class RandomSearchSettings(SearchSettings):
    """The random-pruning baseline: i.i.d. random pure-pruning candidates."""

    kind: Literal["random"] = Field(default="random", description="strategy name in configs")
    budget: int = Field(default=400, ge=1, description="number of evaluations")


class CoordinateDescentSettings(SearchSettings):
    """Greedy per-group subset search with the other groups fixed."""

    kind: Literal["coordinate_descent"] = Field(
        default="coordinate_descent", description="strategy name in configs"
    )
    budget: int = Field(default=1000, ge=1, description="maximum number of evaluations")
    start: Literal["full", "random"] = Field(
        default="full",
        description="first sweep on the full model (unpruned groups) or from the best random pruning",
    )
    random_starts: int = Field(
        default=8, ge=1, description="random pure-pruning candidates tried when start is random"
    )
    max_subsets_per_layer: int = Field(
        default=100, ge=1, description="subsets tried per group and sweep (seeded sample if more)"
    )
    max_sweeps: int | None = Field(
        default=None, ge=1, description="stop after this many sweeps; None: until no improvement"
    )
