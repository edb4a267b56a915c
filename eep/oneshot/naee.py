"""NAEE expert pruning: per MoE layer, keep the experts whose block output best reconstructs the full one.

Objective, as the authors coded it: for a dropped set D of a layer,

    L(D) = sum over calibration batches b of || Z_b - Z^_b(D) ||_F      (not squared)

where Z_b is the layer's routed output on batch b's real tokens and Z^_b(D) the output of the same
layer with D pruned (softmax over the kept experts' logits, top-k, the family's renormalisation).
Enumeration goes over dropped tuples in `itertools.combinations` order and the first minimum wins
(the authors' `min` over an insertion-ordered dict); kept = sorted complement.

How it is computed: a token's expert outputs f_e(x) do not depend on the subset, so
every expert runs once per token (through the experts module's own code) and the token is reduced
to its Gram matrix G = F F^T [E, E] (F = [f_1(x) .. f_E(x)]) plus, for the target z, |z|^2 and
F z [E]. A subset S routes the token to idx_S with weights w_S (k of them), so its squared error

    |z - w_S^T F[idx_S]|^2 = |z|^2 - 2 w_S . (F z)[idx_S] + w_S^T G[idx_S, idx_S] w_S

costs a top-k over E logits and O(k^2) gathers per token and subset instead of k expert outputs
of width d. Squared errors are summed per batch in float64 and the square root taken per batch,
which reproduces the reference objective. A token that a subset routes exactly as the full layer
(layerwise order) contributes exactly 0, as in the reference, so subsets that differ only in
experts nobody uses tie exactly and the first one wins. The reference rounds Z and Z^ to
bfloat16; this runs the experts in the model's dtype and sums in float64, so near-ties can rank
differently from the reference.

Orders:
- `layerwise` (the authors' default): every layer from passes of the unpruned model, independently.
- `progressive`: layer l is chosen on inputs produced by the model with layers < l already pruned,
  against the unpruned model's outputs. Per batch, one forward of the unpruned model up to layer l
  captures the target and one forward with the earlier layers pruned (their routers restricted to
  the kept experts: exactly what the sliced model computes) gives the inputs; nothing is cached.

Many experts (Qwen/OLMoE: 60-64): when C(E, keep) exceeds `max_subsets`, a beam search over
dropped sets replaces enumeration: start from D = {}, add one expert per step, score every
extension of every beam state (at most beam_width * E subsets), keep the `beam_width` best
(ties: the lexicographically first dropped tuple). Greedy is beam_width 1. Each step needs the
statistics of all tokens again, so it is one more pass over the calibration data (memory stays
flat): E - keep passes in all, each costing a model forward plus E/top_k times the usual expert
compute per layer, plus O(beam_width * E * (E + k^2)) per token for the subset scores. In layerwise order
all layers advance together in the same passes; progressive order needs those passes per layer.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from eep.candidate import Candidate
from eep.models.families import MoEFamily, MoELayer, detect_family, get_num_experts, moe_layers
from eep.models.routing import route
from eep.oneshot.calibration import (
    Calibration,
    LayerCall,
    all_expert_outputs,
    stream_layer_calls,
)

log = logging.getLogger(__name__)

Order = Literal["layerwise", "progressive"]
ORDERS: tuple[str, ...] = ("layerwise", "progressive")
DEFAULT_MAX_SUBSETS = 20_000  # C(16, 8) = 12,870 is still enumerated; C(32, 16) is not
DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk of expert outputs / subset weights


class NAEEError(ValueError):
    """A model or setting NAEE cannot handle."""


# ----------------------------------------------------------------------------------- routing


class SubsetRouter:
    """A router restricted to subsets of its experts, computed from its E-wide logits.

    Pruning a router to a kept set (its gate rows sliced, ascending) makes it route over the kept
    experts' logits exactly as before over all of them: `eep.models.routing.route` on those
    columns (softmax over the kept logits, top-k, group-limited on the pruned model's slots for
    DeepSeek-V2, the family's renormalisation, scaling factor and weight cast).
    """

    def __init__(self, layer: MoELayer, family: MoEFamily, config) -> None:
        self.routing = family.routing(config)
        if self.routing.scoring != "softmax":
            raise NAEEError(
                f"{family.name} scores experts with a {self.routing.scoring}: NAEE's subset "
                "routing is implemented for softmax routers"
            )
        self.top_k = int(layer.gate.top_k)

    def route(self, logits: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts and float32 weights for every kept-set row of `keep` [C, E]: [C, N, k] each.

        Every row keeps the same number of experts (one search step scores subsets of one size).
        """
        kept = keep.nonzero()[:, 1].reshape(keep.shape[0], -1)  # [C, keep], ascending
        columns = logits[:, kept].permute(1, 0, 2)  # [C, N, keep]: the pruned routers' logits
        weights, slots = route(columns, self.routing, self.top_k)
        index = kept.unsqueeze(1).expand(-1, logits.shape[0], -1).gather(-1, slots)
        return index, weights.float()

    def check(self, call: LayerCall) -> None:
        """Raise NAEEError unless routing with every expert kept reproduces the model's router."""
        full = torch.ones((1, call.logits.shape[-1]), dtype=torch.bool, device=call.logits.device)
        index, weights = self.route(call.logits, full)
        ours = torch.zeros_like(call.logits, dtype=torch.float64).scatter_(1, index[0], weights[0].double())
        theirs = torch.zeros_like(ours).scatter_(1, call.top_k_index.long(), call.top_k_weights.double())
        close = torch.isclose(ours, theirs, rtol=1e-2, atol=1e-3).all(dim=-1)
        # A few tokens may differ where two experts' logits tie within rounding.
        if close.float().mean() < 0.99:
            raise NAEEError(
                f"MoE layer {call.layer}: recomputing this router's top-k from its logits does not "
                "reproduce the model's routing (grouped or biased top-k?); NAEE cannot score "
                "subsets of this router"
            )


# ----------------------------------------------------------------------------------- search


@dataclass
class _Statistics:
    """Per-token sufficient statistics of one chunk of tokens for scoring subsets.

    With z the target output and w_S a subset's top-k weights on experts idx_S, a token's squared
    error is |z|^2 - 2 w_S . (F z)[idx_S] + w_S^T G[idx_S, idx_S] w_S: O(k^2) per subset.
    """

    logits: torch.Tensor  # [N, E]
    gram: torch.Tensor  # [N, E, E] float64, f_e . f_e'
    target_sq: torch.Tensor  # [N] float64, |z|^2
    target_dot: torch.Tensor  # [N, E] float64, f_e . z
    # Layerwise: the target is the full routing's output; a subset that routes a token exactly
    # like that has error exactly 0 (as in the reference), not the rounding of the expansion.
    full_index: torch.Tensor | None = None  # [N, k]
    full_weights: torch.Tensor | None = None  # [N, k] float32


class _LayerSearch:
    """One layer's candidate dropped sets, step by step, and the loss of every one scored."""

    def __init__(self, num_experts: int, keep: int, max_subsets: int, beam_width: int) -> None:
        self.num_experts = num_experts
        self.drop = num_experts - keep
        self.beam_width = beam_width
        self.method = "enumerate" if math.comb(num_experts, self.drop) <= max_subsets else "beam"
        self.beams: list[tuple[int, ...]] = [()]
        self.losses: dict[tuple[int, ...], float] = {}
        self.candidates: list[tuple[int, ...]] = []
        self.masks: torch.Tensor | None = None
        self._batch_sq: torch.Tensor | None = None
        self._total: torch.Tensor | None = None
        self.steps = 0
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return len(self.beams[0]) == self.drop

    def start_step(self, device: torch.device) -> None:
        if self.method == "enumerate":
            self.candidates = list(itertools.combinations(range(self.num_experts), self.drop))
        else:
            grown = {tuple(sorted((*d, e))) for d in self.beams for e in range(self.num_experts) if e not in d}
            self.candidates = sorted(grown)
        masks = torch.ones((len(self.candidates), self.num_experts), dtype=torch.bool)
        for i, dropped in enumerate(self.candidates):
            masks[i, list(dropped)] = False
        self.masks = masks.to(device)
        self._total = torch.zeros(len(self.candidates), dtype=torch.float64, device=device)
        self._batch_sq = torch.zeros_like(self._total)

    def add(self, stats: _Statistics, router: SubsetRouter, budget: int) -> None:
        n, e = stats.logits.shape
        k = router.top_k
        step = max(1, budget // max(1, n * (e * 12 + k * k * 24)))
        rows = torch.arange(n, device=stats.logits.device)
        gram = stats.gram.reshape(n, e * e)
        for start in range(0, len(self.candidates), step):
            index, weights32 = router.route(stats.logits, self.masks[start : start + step])  # [c, N, k]
            weights = weights32.double()
            dot = stats.target_dot[rows[None, :, None], index]  # [c, N, k]
            pairs = index.unsqueeze(-1) * e + index.unsqueeze(-2)  # [c, N, k, k]
            g = gram[rows[None, :, None, None], pairs]
            quad = (weights.unsqueeze(-1) * g * weights.unsqueeze(-2)).sum(dim=(-1, -2))
            per_token = stats.target_sq - 2 * (weights * dot).sum(dim=-1) + quad  # [c, N]
            if stats.full_index is not None:
                same = (index == stats.full_index).all(dim=-1) & (weights32 == stats.full_weights).all(dim=-1)
                per_token = per_token.masked_fill(same, 0.0)
            self._batch_sq[start : start + step] += per_token.sum(dim=1)

    def end_batch(self) -> None:
        # Rounding can leave a tiny negative sum in the expanded (progressive) form.
        self._total += self._batch_sq.clamp(min=0).sqrt()
        self._batch_sq.zero_()

    def finish_step(self) -> None:
        losses = self._total.tolist()
        for dropped, loss in zip(self.candidates, losses, strict=True):
            self.losses[dropped] = loss
        # Python's sort is stable and candidates are in lexicographic order: a tie keeps the
        # first dropped tuple, the authors' rule.
        order = sorted(range(len(self.candidates)), key=lambda i: losses[i])
        width = 1 if self.method == "enumerate" else self.beam_width
        self.beams = [self.candidates[i] for i in order[:width]]
        self.steps += 1
        self.candidates, self.masks, self._total, self._batch_sq = [], None, None, None

    @property
    def best(self) -> tuple[int, ...]:
        return self.beams[0]


def _statistics(
    call: LayerCall,
    router: SubsetRouter,
    num_experts: int,
    start: int,
    stop: int,
    target: torch.Tensor | None,
) -> _Statistics:
    """Expert outputs of tokens [start, stop) once, reduced to the Gram matrix and target terms."""
    hidden = call.hidden[start:stop]
    outputs = all_expert_outputs(call.experts, hidden, num_experts, call.top_k_weights.dtype)
    f = outputs.double()  # [n, E, d]
    gram = f @ f.transpose(1, 2)  # [n, E, E]
    logits = call.logits[start:stop]
    if target is None:
        everything = torch.ones((1, num_experts), dtype=torch.bool, device=logits.device)
        index, weights = router.route(logits, everything)
        dense = torch.zeros((hidden.shape[0], num_experts), dtype=torch.float64, device=logits.device)
        dense.scatter_(1, index[0], weights[0].double())
        target_dot = torch.einsum("nef,nf->ne", gram, dense)  # f_e . z with z = sum_f w_f f_f
        return _Statistics(
            logits, gram, (dense * target_dot).sum(dim=-1), target_dot, index[0], weights[0]
        )
    z = target[start:stop].double()  # [n, d]
    return _Statistics(logits, gram, (z * z).sum(dim=-1), torch.einsum("ned,nd->ne", f, z))


# ----------------------------------------------------------------------------------- driver


@dataclass
class NAEEResult:
    """The chosen experts and everything measured on the way."""

    kept: list[list[int]]  # per MoE layer, ascending original indices
    losses: list[dict[tuple[int, ...], float]]  # per layer: dropped tuple -> loss, every one scored
    methods: list[str]  # per layer: "enumerate" or "beam"
    order: str
    num_experts: int
    tokens: int
    passes: int  # forward passes over the calibration data (progressive: truncated ones too)
    seconds: float
    layer_seconds: list[float] = field(default_factory=list)  # expert outputs + subset scoring

    def candidate(self, model_id: str = "", top_k: int | None = None, **extra: object) -> Candidate:
        """The pruning as an ordinary candidate (phase "oneshot")."""
        return Candidate.from_kept(
            self.kept,
            self.num_experts,
            top_k,
            model_id=model_id,
            phase="oneshot",
            extra={
                "method": "naee",
                "order": self.order,
                "search": sorted(set(self.methods)),
                "calibration_tokens": self.tokens,
                "loss": [self.losses[i][self._dropped(i)] for i in range(len(self.kept))],
                **extra,
            },
        )

    def kept_at(self, layer: int, keep: int) -> list[int] | None:
        """The best kept set of `keep` experts this run scored in `layer` (None: none of that size).

        A beam search scores every size from E - 1 down to its keep on the way, so one run at the
        smallest keep answers for the larger ones too; an enumeration scores its own keep only.
        Ties: the first scored (the lexicographic rule of the search itself).
        """
        size = self.num_experts - keep
        best: tuple[float, tuple[int, ...]] | None = None
        for dropped, loss in self.losses[layer].items():
            if len(dropped) == size and (best is None or loss < best[0]):
                best = (loss, dropped)
        if best is None:
            return None
        return [e for e in range(self.num_experts) if e not in best[1]]

    def _dropped(self, layer: int) -> tuple[int, ...]:
        return tuple(e for e in range(self.num_experts) if e not in self.kept[layer])


@torch.no_grad()
def naee_prune(
    model: nn.Module,
    calibration: Calibration,
    keep: int,
    order: Order = "layerwise",
    max_subsets: int = DEFAULT_MAX_SUBSETS,
    beam_width: int = 1,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> NAEEResult:
    """Choose `keep` experts per MoE layer by NAEE (see the module docstring)."""
    if order not in ORDERS:
        raise NAEEError(f"order must be one of {ORDERS}, got {order!r}")
    if beam_width < 1 or max_subsets < 1:
        raise NAEEError("beam_width and max_subsets must be >= 1")
    family = detect_family(model.config)
    layers = moe_layers(model)
    num_experts = get_num_experts(model.config, family)
    top_k = int(layers[0].gate.top_k)
    if not top_k <= keep <= num_experts:
        raise NAEEError(f"keep={keep} must be in top_k={top_k}..num_experts={num_experts}")
    routers = [SubsetRouter(layer, family, model.config) for layer in layers]
    searches = [_LayerSearch(num_experts, keep, max_subsets, beam_width) for _ in layers]
    routing = routers[0].routing
    if routing.grouped:
        # A beam search scores subsets of every size from E - 1 down to keep, most of which
        # cannot be split into n_group equal groups.
        refusal = routing.keep_refusal(keep)
        if refusal is None and searches[0].method == "beam":
            refusal = f"C({num_experts}, {keep}) > max_subsets={max_subsets} needs a beam search"
        if refusal is not None:
            raise NAEEError(
                f"{family.name}'s grouped routing ({routing.topk_method}, n_group="
                f"{routing.n_group}): {refusal}; NAEE scores only whole enumerations of keep "
                "experts there"
            )
    device = model.get_input_embeddings().weight.device
    chunk = max(1, memory_budget // (num_experts * layers[0].experts.gate_up_proj.shape[-1] * 12))
    runner = _Runner(model, calibration, routers, searches, num_experts, chunk, memory_budget, device)
    start = time.perf_counter()
    if order == "layerwise":
        runner.layerwise()
    else:
        runner.progressive()
    result = NAEEResult(
        kept=[sorted(set(range(num_experts)) - set(s.best)) for s in searches],
        losses=[s.losses for s in searches],
        methods=[s.method for s in searches],
        order=order,
        num_experts=num_experts,
        tokens=calibration.tokens,
        passes=runner.passes,
        seconds=time.perf_counter() - start,
        layer_seconds=[s.seconds for s in searches],
    )
    log.info(
        "NAEE %s: %d layers, passes over the data: %d, %.2f s; kept %s",
        order, len(layers), result.passes, result.seconds, result.kept,
    )
    return result


class _Runner:
    """The passes over the calibration data for both orders."""

    def __init__(self, model, calibration, routers, searches, num_experts, chunk, budget, device):
        self.model = model
        self.calibration = calibration
        self.routers: list[SubsetRouter] = routers
        self.searches: list[_LayerSearch] = searches
        self.num_experts = num_experts
        self.chunk = chunk
        self.budget = budget
        self.device = device
        self.passes = 0
        self._checked: set[int] = set()

    def _score(self, call: LayerCall, target: torch.Tensor | None = None) -> None:
        search, router = self.searches[call.layer], self.routers[call.layer]
        if call.layer not in self._checked:
            router.check(call)
            self._checked.add(call.layer)
        tick = time.perf_counter()
        for start in range(0, call.hidden.shape[0], self.chunk):
            stop = start + self.chunk
            stats = _statistics(call, router, self.num_experts, start, stop, target)
            search.add(stats, router, self.budget)
        search.seconds += time.perf_counter() - tick

    def layerwise(self) -> None:
        while True:
            active = [i for i, s in enumerate(self.searches) if not s.done]
            if not active:
                return
            for i in active:
                self.searches[i].start_step(self.device)

            def end_batch(_b: int, active=active) -> None:
                for i in active:
                    self.searches[i].end_batch()

            stream_layer_calls(self.model, self.calibration, self._score, layers=active, on_batch_end=end_batch)
            self.passes += 1
            for i in active:
                self.searches[i].finish_step()

    def _unpruned_output(self, one: Calibration, layer: int) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        stream_layer_calls(
            self.model, one, lambda c: captured.append(c.output), layers=[layer], stop_after=layer
        )
        return captured[0]

    def progressive(self) -> None:
        keep_masks: dict[int, torch.Tensor] = {}

        def restrict(layer: int, output: tuple) -> tuple:
            if layer not in keep_masks:
                return output
            logits, weights = output[0], output[1]
            flat = logits.reshape(-1, logits.shape[-1])
            index, new_weights = self.routers[layer].route(flat, keep_masks[layer][None])
            return (logits, new_weights[0].to(weights.dtype), index[0].to(output[2].dtype))

        for layer, search in enumerate(self.searches):
            while not search.done:
                search.start_step(self.device)
                for batch in self.calibration:
                    one = Calibration([batch])
                    target = None
                    if keep_masks:
                        # The unpruned model's output at this layer on unpruned inputs.
                        target = self._unpruned_output(one, layer)
                    stream_layer_calls(
                        self.model, one, lambda c, t=target: self._score(c, t),
                        layers=[layer], stop_after=layer, gate_override=restrict,
                    )
                    search.end_batch()
                self.passes += 1 + bool(keep_masks)
                search.finish_step()
            mask = torch.ones(self.num_experts, dtype=torch.bool, device=self.device)
            mask[list(search.best)] = False
            keep_masks[layer] = mask


def kept_from_losses(losses: dict[tuple[int, ...], float], num_experts: int) -> list[int]:
    """The authors' selection from a dropped-tuple -> loss table: first minimum in insertion order."""
    dropped = min(losses, key=losses.get)
    return sorted(set(range(num_experts)) - set(dropped))


def enumeration_size(num_experts: int, keep: int) -> int:
    """Subsets NAEE enumerates per layer: C(E, E - keep)."""
    return math.comb(num_experts, num_experts - keep)


def describe_kept(kept: Sequence[Sequence[int]]) -> str:
    """`0:[0, 2, 5, 7] 1:[...]` for logs."""
    return " ".join(f"{i}:{list(k)}" for i, k in enumerate(kept))
