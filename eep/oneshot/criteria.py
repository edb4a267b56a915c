"""Per-expert pruning criteria, all from one pass over calibration data; each layer keeps its top scores.

For expert e of a layer, over the calibration tokens x (padding excluded):

- `frequency`: how many tokens route to e (e among the router's top-k).
- `soft_activation`: the mean routing probability of e over all tokens, p_e(x) = softmax(logits)_e
  (sigmoid routers: sigmoid(logits)_e), whether or not e is in the top-k.
- `reap` (Lasby et al. 2025, "REAP the Experts", arXiv 2510.13999): the mean, over the tokens X_e
  routed to e, of g_e(x) * ||f_e(x)||_2, where g_e(x) is the routing weight the block multiplies
  e's output by (after the family's top-k renormalisation) and f_e(x) the expert's output; 0 for an
  expert no token reaches. Only routed tokens run through e, so the pass costs about one forward.
- `random`: a uniform draw of `keep` experts per layer (no data).

A layer keeps the `keep` highest-scoring experts; a tie goes to the lower expert index. Kept experts
are listed in ascending order (slot order of the pruned model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eep.candidate import Candidate
from eep.models.families import detect_family, get_num_experts, moe_layers
from eep.models.routing import expert_scores
from eep.oneshot.calibration import Calibration, LayerCall, expert_output, stream_layer_calls

CRITERIA: tuple[str, ...] = ("frequency", "soft_activation", "reap")


@dataclass
class CriteriaScores:
    """Every criterion's score per MoE layer and expert ([layers, E] float64), from one pass."""

    frequency: torch.Tensor
    soft_activation: torch.Tensor
    reap: torch.Tensor
    tokens: int  # calibration tokens seen per layer

    def scores(self, criterion: str) -> torch.Tensor:
        """The [layers, E] scores of one criterion."""
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; criteria: {', '.join(CRITERIA)}")
        return getattr(self, criterion)

    def kept(self, criterion: str, keep: int) -> list[list[int]]:
        """Per layer, the `keep` best experts by `criterion`, ascending."""
        return keep_top(self.scores(criterion), keep)

    def candidate(self, criterion: str, keep: int, model_id: str = "", **extra: object) -> Candidate:
        """The criterion's pruning as an ordinary candidate (phase "oneshot")."""
        scores = self.scores(criterion)
        return Candidate.from_kept(
            self.kept(criterion, keep),
            int(scores.shape[1]),
            model_id=model_id,
            phase="oneshot",
            extra={"method": criterion, "calibration_tokens": self.tokens, **extra},
        )


def keep_top(scores: torch.Tensor, keep: int) -> list[list[int]]:
    """Per row, the indices of the `keep` largest scores (ties: lower index), sorted ascending."""
    num_experts = scores.shape[1]
    if not 1 <= keep <= num_experts:
        raise ValueError(f"keep={keep} must be in 1..{num_experts}")
    kept = []
    for row in scores.tolist():
        order = sorted(range(num_experts), key=lambda e: (-row[e], e))
        kept.append(sorted(order[:keep]))
    return kept


@torch.no_grad()
def _count_choices(counts: torch.Tensor, call: LayerCall, num_experts: int) -> None:
    """Add one layer call's top-k choices to `counts[layer]` (the `frequency` criterion)."""
    index = call.top_k_index.reshape(-1).long().to(counts.device)
    counts[call.layer] += torch.bincount(index, minlength=num_experts).double()


def frequency_counts(model: nn.Module, calibration: Calibration) -> torch.Tensor:
    """[layers, experts] top-k choice counts (`frequency`) from a pass with no extra expert calls."""
    num_experts = get_num_experts(model.config, detect_family(model.config))
    device = model.get_input_embeddings().weight.device
    counts = torch.zeros((len(moe_layers(model)), num_experts), dtype=torch.float64, device=device)
    stream_layer_calls(model, calibration, lambda call: _count_choices(counts, call, num_experts))
    return counts.cpu()


def criteria_scores(model: nn.Module, calibration: Calibration) -> CriteriaScores:
    """Frequency, soft-activation and REAP scores of every expert, from one calibration pass."""
    family = detect_family(model.config)
    routing = family.routing(model.config)
    layers = moe_layers(model)
    num_experts = get_num_experts(model.config, family)
    shape = (len(layers), num_experts)
    device = model.get_input_embeddings().weight.device
    counts = torch.zeros(shape, dtype=torch.float64, device=device)
    prob_sums = torch.zeros(shape, dtype=torch.float64, device=device)
    reap_sums = torch.zeros(shape, dtype=torch.float64, device=device)
    tokens = torch.zeros(len(layers), dtype=torch.float64, device=device)

    def on_call(call: LayerCall) -> None:
        i = call.layer
        logits = call.logits.float()
        probs = expert_scores(logits, routing)
        prob_sums[i] += probs.sum(dim=0).double()
        tokens[i] += logits.shape[0]
        _count_choices(counts, call, num_experts)
        index = call.top_k_index.long()
        for e in index.unique().tolist():
            rows, slots = torch.nonzero(index == e, as_tuple=True)
            out = expert_output(call.experts, call.hidden[rows], e, call.top_k_weights.dtype)
            norms = out.double().norm(dim=-1)  # [n_e]
            reap_sums[i, e] += (call.top_k_weights[rows, slots].double() * norms).sum()

    stream_layer_calls(model, calibration, on_call)
    return CriteriaScores(
        frequency=counts.cpu(),
        soft_activation=(prob_sums / tokens[:, None].clamp(min=1)).cpu(),
        reap=(reap_sums / counts.clamp(min=1)).cpu(),
        tokens=int(tokens[0].item()),
    )


def random_candidate(num_layers: int, num_experts: int, keep: int, seed: int = 0, model_id: str = "") -> Candidate:
    """Uniformly random pruning, `keep` experts per layer, as a one-shot candidate."""
    return Candidate.random_pruning(
        num_layers, num_experts, keep, generator=seed, model_id=model_id, phase="oneshot",
        extra={"method": "random", "seed": seed},
    )
