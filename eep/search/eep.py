"""EEP's evolutionary search (Liu et al. 2024, and the authors' released code), as an ask/tell strategy.

Steady state over an unbounded archive of every told result. Each child: draw per-group change
flags, breed (crossover in the merging phase, else a copy of a mutation parent), then a discrete
re-pick of kept experts (pruning phase) or a Gaussian perturbation of R and M (merging phase),
and sometimes normalise the merging rows. The phase follows the number of told results.

A genome is the list of group matrices: the merging matrices M of every group, then the router
matrices R of every group (the authors' key order: `layers.*` then `transfer.*`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from eep.candidate import Candidate
from eep.search.base import BaseStrategy
from eep.search.budget import move_slot
from eep.search.registry import Finalists, StrategyEntry, register
from eep.search.settings import EEPSettings
from eep.search.state import Evaluated

# Score gaps within this of a threshold count as equal to it: in 0..1 units 0.83 - 0.82 is
# 0.01000000000000001, while the authors' percent points give exactly 1.0 (not > 1.0).
SCORE_TOLERANCE = 1e-9
# Row sums closer to zero than this are left alone by normalisation (the authors divide by them).
NORM_EPSILON = 1e-8


class EEPStrategy(BaseStrategy):
    """EEP: random pure-pruning inits, a discrete pruning phase, then a continuous merging phase."""

    kind = "eep"

    def __init__(
        self,
        settings: EEPSettings,
        num_layers: int,
        num_experts: int,
        seed: int = 0,
        model_id: str = "",
        init_from: Sequence[Candidate] = (),
        id_prefix: str = "",
    ) -> None:
        super().__init__(settings, num_layers, num_experts, seed, model_id, id_prefix)
        self.settings: EEPSettings = settings
        # Given pure-pruning candidates (e.g. NAEE's) take the first init slots.
        self._init_queue: list[tuple[list[list[int]], str]] = [
            (self._check_pure_pruning(c, "init_from candidate"), c.id) for c in init_from
        ]
        self._inits_asked = 0
        self._genomes: dict[str, list[torch.Tensor]] = {}  # id -> group matrices (derived cache)

    # ----------------------------------------------------------------------------- public
    @property
    def phase(self) -> str:
        """Phase of the next candidate: "init", "prune" (discrete) or "merge" (continuous)."""
        if self._in_init():
            return "init"
        return "merge" if self.evaluations > self.settings.discrete_iter else "prune"

    def prune_only_best(self, n: int = 1) -> list[tuple[Candidate, float]]:
        """The n best pure-pruning candidates (inits and pruning-phase children): "EEP prune-only"."""
        ranked = sorted(
            (e for e in self._state.successful() if e.candidate.phase in ("init", "prune")),
            key=lambda e: -e.score,
        )
        return [(e.candidate, e.score) for e in ranked[:n]]

    def rejection_threshold(self, candidate: Candidate, finalists: int) -> float | None:
        """The lowest score at which `candidate` could be a parent or a finalist (None: any could).

        A parent pool only narrows as better results come in, so a candidate under the pool's
        current bottom never becomes a parent later either.
        """
        entries = self._state.successful()
        scores = sorted((e.score for e in entries), reverse=True)
        s = self.settings
        merging = candidate.phase == "merge"
        pools = [_pool_threshold(scores, s.mutate_parents_select_type, s.mutate_parents_threshold,
                                 s.mutate_parents_rank, inclusive=True)]
        if merging:
            pools.append(_pool_threshold(scores, s.crossover_parents_select_type,
                                         s.crossover_parents_threshold, s.crossover_parents_rank,
                                         inclusive=False))
        # Finalists: the best overall, and (pure pruning) the best prune-only candidates.
        tops = [self._top_threshold(entries, finalists)]
        if not merging:
            pruned = [e for e in entries if e.candidate.phase in ("init", "prune")]
            tops.append(self._top_threshold(pruned, finalists))
        threshold = min(pools + tops)
        return None if threshold == float("-inf") else threshold

    # ----------------------------------------------------------------------------- hooks
    def _finished(self) -> bool:
        return self.evaluations > self.settings.total_iter

    def _capacity(self) -> int:
        return self.settings.total_iter + 1 - self._used()

    def _on_ask(self, candidate: Candidate) -> None:
        if candidate.phase == "init":
            self._inits_asked += 1

    def _on_exhausted(self) -> bool:
        if not self._in_init():
            return False
        # Fewer distinct pure prunings exist than init slots: end the init phase early.
        self._init_queue = []
        self._inits_asked = max(self._inits_asked, self.settings.init_population)
        return True

    def _propose(self) -> Candidate | None:
        if self._in_init():
            return self._propose_init()
        ranked = self._ranked()
        if not ranked:
            # Breeding needs a told, successful candidate. Until there is one, keep up to
            # init_population inits in flight (failed inits are replaced, nothing hangs).
            if len(self._state.pending) >= self.settings.init_population:
                return None
            return self._random_init()
        # Most pruning-phase children are exact copies of their parent (few flags, few rows
        # re-picked); those are duplicates anyway, so re-breed before building a Candidate.
        for _ in range(self.settings.max_duplicate_tries):
            genome, parents, operator, unchanged = self._breed(ranked)
            if not unchanged:
                break
        phase = "merge" if self.evaluations > self.settings.discrete_iter else "prune"
        groups = self.groups.num_groups
        return self._candidate(genome[:groups], genome[groups:], phase, parents, operator=operator)

    def _strategy_state(self) -> dict:
        return {
            "init_queue": [[kept, source] for kept, source in self._init_queue],
            "inits_asked": self._inits_asked,
        }

    def _load_strategy_state(self, state: dict) -> None:
        self._init_queue = [
            ([list(g) for g in kept], source) for kept, source in state["init_queue"]
        ]
        self._inits_asked = int(state["inits_asked"])
        self._genomes = {}

    # ----------------------------------------------------------------------------- internals
    def _in_init(self) -> bool:
        return bool(self._init_queue) or self._inits_asked < self.settings.init_population

    def _propose_init(self) -> Candidate:
        if not self._init_queue:
            return self._random_init()
        kept, source = self._init_queue.pop(0)
        merge = [self._one_hot(experts) for experts in kept]
        parents = (source,) if source else ()
        return self._candidate(merge, [m.clone() for m in merge], "init", parents, operator="given")

    def _random_init(self) -> Candidate:
        merge = self._random_pruning()
        return self._candidate(merge, [m.clone() for m in merge], "init", operator="random")

    def _ranked(self) -> list[Evaluated]:
        """Successful archive entries by score, best first, equal scores in random order."""
        entries = sorted(self._state.successful(), key=lambda e: -e.score)
        out: list[Evaluated] = []
        i = 0
        while i < len(entries):
            j = i + 1
            while j < len(entries) and entries[j].score == entries[i].score:
                j += 1
            run = entries[i:j]
            if len(run) > 1:
                run = [run[k] for k in self._rng.permutation(len(run))]
            out.extend(run)
            i = j
        return out

    def _genome(self, candidate: Candidate) -> list[torch.Tensor]:
        genome = self._genomes.get(candidate.id)
        if genome is None:
            merge, router = self._group_matrices(candidate)
            genome = merge + router
            self._genomes[candidate.id] = genome
        return genome

    def _breed(
        self, ranked: list[Evaluated]
    ) -> tuple[list[torch.Tensor], tuple[str, ...], str, bool]:
        """One child: (genome, parent ids, operator, whether it equals its mutation parent)."""
        s = self.settings
        groups = self.groups.num_groups
        scores = [e.score for e in ranked]
        merging = self.evaluations > s.discrete_iter
        flags = draw_flags(
            [s.weight_change_prob] * groups + [s.transfer_change_prob] * groups, self._rng
        )
        # The authors draw the crossover coin for every child, in the pruning phase too.
        crossover_coin = self._rng.random() < s.crossover_prob
        genome: list[torch.Tensor] | None = None
        parent_genome: list[torch.Tensor] | None = None
        operator = "mutate"
        if merging and crossover_coin:
            pair = select_crossover_parents(
                scores,
                s.crossover_parents_select_type,
                s.crossover_parents_threshold,
                s.crossover_parents_rank,
                self._rng,
            )
            if pair is not None and not _same_shapes(ranked[pair[0]].candidate, ranked[pair[1]].candidate):
                pair = None  # a global budget: rows mix only between parents of one allocation
            if pair is not None:
                first, second = ranked[pair[0]].candidate, ranked[pair[1]].candidate
                genome = crossover(
                    self._genome(first), self._genome(second), flags, s.from_front_prob, self._rng
                )
                parents: tuple[str, ...] = (first.id, second.id)
                operator = "crossover"
        if genome is None:
            index = select_mutation_parent(
                scores,
                s.mutate_parents_select_type,
                s.mutate_parents_threshold,
                s.mutate_parents_rank,
                self._rng,
            )
            parent = ranked[index].candidate
            parent_genome = self._genome(parent)
            genome = [t.clone() for t in parent_genome]
            parents = (parent.id,)
        if merging:
            genome = continuous_mutate(genome, flags, s.mutate_prob, s.mutate_scale, self._rng)
        else:
            _check_discrete(genome, groups, parents[0])
            merge = discrete_mutate(
                genome[:groups], flags[:groups], s.discrete_mutate_prob, self._rng
            )
            if not self.budget.is_uniform and self._rng.random() < s.slot_move_prob:
                merge = move_slot(merge, self.budget, self._rng)
                operator += "+move"
            genome = merge + [m.clone() for m in merge]  # R follows M in the pruning phase
        if self._rng.random() < s.norm_prob:
            genome = normalise_rows(genome[:groups]) + genome[groups:]
            operator += "+norm"
        unchanged = parent_genome is not None and all(
            torch.equal(a, b) for a, b in zip(genome, parent_genome, strict=True)
        )
        return genome, parents, operator, unchanged


# --------------------------------------------------------------------------------- operators
def draw_flags(probs: Sequence[float], rng: np.random.Generator) -> list[bool]:
    """One Bernoulli(p_g) flag per group key, re-drawn until at least one is set."""
    p = np.asarray(probs, dtype=np.float64)
    if not (p > 0).any():
        raise ValueError("every change probability is 0: no flag can ever be set")
    while True:
        flags = rng.random(len(p)) < p
        if flags.any():
            return [bool(f) for f in flags]


def discrete_mutate(
    merge: Sequence[torch.Tensor], flags: Sequence[bool], prob: float, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Pruning-phase mutation: in flagged groups re-pick each row's expert with probability `prob`.

    The new expert is drawn uniformly among those no other row keeps (the row's old one allowed),
    so rows stay one-hot and a group's kept experts stay distinct.
    """
    out = []
    for m, flag in zip(merge, flags, strict=True):
        m = m.clone()
        if flag:
            keep, num_experts = m.shape
            for i in range(keep):
                if rng.random() < prob:
                    m[i] = 0.0
                    while True:
                        column = int(rng.integers(num_experts))
                        if not bool((m[:, column] == 1.0).any()):
                            break
                    m[i, column] = 1.0
        out.append(m)
    return out


def continuous_mutate(
    genome: Sequence[torch.Tensor],
    flags: Sequence[bool],
    prob: float,
    scale: float,
    rng: np.random.Generator,
) -> list[torch.Tensor]:
    """Merging-phase mutation: add scale * N(0, 1) to each entry of a flagged matrix w.p. `prob`."""
    out = []
    for m, flag in zip(genome, flags, strict=True):
        m = m.clone()
        if flag:
            hit = rng.random(tuple(m.shape)) < prob
            noise = rng.standard_normal(tuple(m.shape)) * scale
            m += torch.from_numpy(np.where(hit, noise, 0.0)).to(torch.float32)
        out.append(m)
    return out


def crossover(
    first: Sequence[torch.Tensor],
    second: Sequence[torch.Tensor],
    flags: Sequence[bool],
    from_front_prob: float,
    rng: np.random.Generator,
) -> list[torch.Tensor]:
    """Flagged matrices mix rows of both parents; others come whole from one parent.

    Each row (flagged) or matrix (not flagged) comes from `first` with probability
    `from_front_prob`, else from `second`.
    """
    out = []
    for a, b, flag in zip(first, second, flags, strict=True):
        if flag:
            from_first = torch.from_numpy(rng.random(a.shape[0]) < from_front_prob)
            out.append(torch.where(from_first[:, None], a, b))
        else:
            out.append((a if rng.random() < from_front_prob else b).clone())
    return out


def normalise_rows(merge: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Divide every row by its sum (rows summing to ~0 are left as they are)."""
    out = []
    for m in merge:
        sums = m.sum(dim=1, keepdim=True)
        ok = sums.abs() > NORM_EPSILON
        out.append(torch.where(ok, m / torch.where(ok, sums, torch.ones_like(sums)), m))
    return out


# --------------------------------------------------------------------------------- selection
def absolute_pool_end(scores: Sequence[float], threshold: float) -> int:
    """i*: index of the first candidate more than `threshold` below the best, else the last index.

    `scores` are sorted best first. Gaps within SCORE_TOLERANCE of the threshold are not above it.
    """
    best = scores[0]
    for i in range(1, len(scores)):
        if best - scores[i] > threshold + SCORE_TOLERANCE:
            return i
    return max(len(scores) - 1, 0)


def _pool_threshold(
    scores: Sequence[float], select_type: str, threshold: float, rank: int, inclusive: bool
) -> float:
    """The lowest score a newcomer needs to land in a parent pool of `scores` (best first).

    The pool is indices 0..end (`inclusive`, mutation) or 0..end-1 (crossover), end being
    `rank` (ranking) or max(i*, rank) (absolute; i* the first index more than `threshold` below
    the best, which the pool includes: the authors' off-by-one). A newcomer with a lower score
    than the pool's last member sorts after it, unless (absolute) it is within `threshold` of
    the best and so moves i* down. -inf when every newcomer would be in the pool.
    """
    if not scores:
        return float("-inf")
    if select_type == "absolute":
        best = scores[0]
        first_out = next(
            (i for i in range(1, len(scores)) if best - scores[i] > threshold + SCORE_TOLERANCE),
            None,
        )
        if first_out is None:
            return float("-inf")  # every score is inside: so is any newcomer (the pool's end moves)
        end = max(first_out, rank)
        inside = best - threshold - SCORE_TOLERANCE
    else:
        end = rank
        inside = float("inf")
    last = end if inclusive else end - 1
    if last < 0:
        return float("inf")  # an empty pool: no newcomer can enter it
    return min(scores[last], inside) if last < len(scores) else float("-inf")


def select_mutation_parent(
    scores: Sequence[float],
    select_type: str,
    threshold: float,
    rank: int,
    rng: np.random.Generator,
) -> int:
    """Index of the mutation parent in `scores` (sorted best first), as the authors pick it.

    absolute: uniform in [0, max(i*, rank)] inclusive, so the pool includes the first candidate
    outside the threshold (the authors' off-by-one); ranking: uniform in [0, rank]. Clipped to
    the last index.
    """
    if not scores:
        raise ValueError("no candidates to select a parent from")
    if select_type == "ranking":
        end = rank
    elif select_type == "absolute":
        end = max(absolute_pool_end(scores, threshold), rank)
    else:
        raise ValueError(f"unknown parent select type {select_type!r}")
    return min(len(scores) - 1, int(rng.integers(0, end + 1)))


def select_crossover_parents(
    scores: Sequence[float],
    select_type: str,
    threshold: float,
    rank: int,
    rng: np.random.Generator,
) -> tuple[int, int] | None:
    """Two distinct indices from the first max(i*, rank) (absolute) or `rank` (ranking) entries.

    In the order drawn (the first one is the "front" parent). None when the pool holds fewer than
    two candidates (the child is then bred by mutation).
    """
    if select_type == "ranking":
        size = rank
    elif select_type == "absolute":
        size = max(absolute_pool_end(scores, threshold), rank) if scores else 0
    else:
        raise ValueError(f"unknown parent select type {select_type!r}")
    size = min(size, len(scores))
    if size < 2:
        return None
    a, b = rng.choice(size, size=2, replace=False)
    return int(a), int(b)


def _same_shapes(a: Candidate, b: Candidate) -> bool:
    """Whether two candidates keep the same number of experts in every layer."""
    return a.keep_per_layer == b.keep_per_layer


def _check_discrete(genome: Sequence[torch.Tensor], groups: int, parent: str) -> None:
    """A pruning-phase parent must be pure pruning: one-hot rows, distinct experts, M == R."""
    for g in range(groups):
        m, r = genome[g].numpy(), genome[groups + g].numpy()
        one_hot = bool(((m == 0) | (m == 1)).all() and (m.sum(axis=1) == 1).all())
        if not (one_hot and (m.sum(axis=0) <= 1).all() and np.array_equal(m, r)):
            raise ValueError(
                f"pruning-phase parent {parent!r} is not pure pruning in group {g}; was "
                "discrete_iter lowered on resume?"
            )


def _build(
    settings: EEPSettings,
    num_layers: int,
    num_experts: int,
    seed: int,
    model_id: str,
    init_from: Sequence[Candidate],
) -> EEPStrategy:
    return EEPStrategy(settings, num_layers, num_experts, seed, model_id, init_from=init_from)


register(
    StrategyEntry(
        kind="eep",
        settings=EEPSettings,
        factory=_build,
        # The pruning phase's dev winner ("prune-only") also competes for the final choice.
        finalists=(
            Finalists(
                "eep_prune_only", "EEP prune-only", EEPStrategy.prune_only_best, ("init", "prune")
            ),
            Finalists("eep", "EEP prune+merge"),
        ),
        expected_evaluations=lambda settings: settings.total_iter + 1,
    )
)
