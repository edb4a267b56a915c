"""The routing math of every supported family, in one place, and the EEP router mapping.

`route(logits, routing, top_k)` computes what a family's stock router computes from its logits
(`Routing`, in `eep.models.families`, says which family does what), over the columns it is given:
all E experts, the kept experts of a pruning (NAEE gathers their logits), or, with a router map R,
the k slots of a merged layer. Surgery, the mapped router and its exported checkpoints, NAEE,
the criteria and dynamic skipping all call it; none has a copy.

The EEP authors' router mapping (their patched Mixtral block): with gate G [E, d] unchanged and
router map R [k, E], for tokens x

    p  = softmax(x G^T)            over all E original experts, float32   [T, E]
    p' = p R^T                     scores of the k kept slots             [T, k]

and then the family's routing on p' instead of on the pruned router's probabilities: top-k
(group-limited on slots for DeepSeek-V2), renormalisation, scaling factor, cast. For a family that
does not renormalise its top-k weights (Qwen/OLMoE without `norm_topk_prob`, DeepSeek-V2) p' is
divided by its sum over the k slots first, so that a one-hot R gives exactly what that family's
pruned model computes (softmax over the kept experts' logits); for Mixtral nothing changes.

Group-limited top-k on slots: slot i belongs to group i // (k / n_group), as in the stock router
of a checkpoint with k experts, which is what pure pruning exports and evaluates. So a one-hot
row's slot is in the group pure pruning puts it in, a mixed row needs no rule of its own, and a
(near-)one-hot R reproduces pure pruning. The candidate's slot order therefore decides the groups;
`Routing.keep_refusal` requires k to be a multiple of n_group.

Sigmoid scoring (DeepSeek-V3) has no probability mapping: `Routing.mapping_refusal` says so and
the router refuses; `logits`-mode candidates route such models through the stock gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eep.candidate import CandidateError
from eep.models.families import Routing


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The gate's logits x G^T, in float32 where the family computes them so (DeepSeek)."""
    if routing.float32_logits:
        return F.linear(hidden.float(), weight.float())
    return F.linear(hidden, weight)


def expert_scores(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Float32 per-expert scores: softmax over the last dimension, or elementwise sigmoid."""
    if routing.scoring == "sigmoid":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)


def route(
    logits: torch.Tensor,
    routing: Routing,
    top_k: int,
    router_map: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k weights and column indices of a family's router, both [..., top_k].

    `logits` [..., C] are the router logits of C experts (the columns); with `router_map` [k, C]
    the columns become its k slots, scored by the EEP mapping (softmax scoring only). `bias`
    (DeepSeek-V3's score-correction bias, in the columns' space) shifts the choice, not the
    weights. Weights are float32, or the logits' dtype where the family casts them.
    """
    scores = expert_scores(logits, routing)
    if router_map is not None:
        refusal = routing.mapping_refusal()
        if refusal is not None:
            raise CandidateError(refusal)
        scores = scores @ router_map.to(scores.device, torch.float32).t()
        if not routing.renormalize:
            scores = scores / scores.sum(dim=-1, keepdim=True)
    choice = scores if bias is None else scores + bias.to(scores.device, torch.float32)
    choice = _limit_to_groups(choice, routing)
    index = torch.topk(choice, top_k, dim=-1).indices
    if routing.topk_method == "group_limited_greedy":
        # DeepSeek-V2 takes the weights from the masked scores: 0 for an expert outside the
        # chosen groups (only reached when those groups hold fewer than top_k experts).
        scores = choice
    if routing.renormalize and routing.scoring == "softmax" and router_map is None:
        # = p_top / sum(p_top), computed from the top-k logits alone: it does not depend on the
        # other columns, so subsets with the same top-k get bit-identical weights (NAEE ties).
        weights = torch.softmax(logits.float().gather(-1, index), dim=-1)
    else:
        weights = scores.gather(-1, index)
        if routing.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + routing.renorm_epsilon)
    if routing.scaling_factor != 1.0:
        weights = weights * routing.scaling_factor
    if routing.cast_weights:
        weights = weights.to(logits.dtype)
    return weights, index


def sole_expert_weight(weight: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The weight an expert gets when it is a token's only one (top-1), given its top-k weight.

    Renormalising routers give a lone expert 1 (times the scaling factor); the others keep its
    weight (already scaled).
    """
    if routing.renormalize:
        return torch.full_like(weight, routing.scaling_factor)
    return weight


def _limit_to_groups(choice: torch.Tensor, routing: Routing) -> torch.Tensor:
    """`choice` with the columns outside each row's best `topk_group` groups masked out."""
    if not routing.grouped:
        return choice
    *lead, columns = choice.shape
    grouped = choice.reshape(*lead, routing.n_group, columns // routing.n_group)
    if routing.topk_method == "group_limited_greedy":
        group_scores, fill = grouped.max(dim=-1).values, 0.0
    else:  # noaux_tc
        group_scores, fill = grouped.topk(2, dim=-1).values.sum(dim=-1), float("-inf")
    best = torch.topk(group_scores, routing.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), fill).reshape(*lead, columns)


class ProbabilityMappedRouter(nn.Module):
    """Router of k slots scored as R @ softmax(G x); G stays the original [E, d] gate."""

    def __init__(
        self,
        hidden_dim: int,
        num_router_experts: int,
        keep: int,
        top_k: int,
        routing: Routing,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for refusal in (routing.mapping_refusal(), routing.keep_refusal(keep)):
            if refusal is not None:
                raise CandidateError(f"router mapping onto {keep} slots: {refusal}")
        self.hidden_dim = hidden_dim
        self.num_router_experts = num_router_experts
        self.num_experts = keep
        self.top_k = top_k
        self.routing = routing
        self.weight = nn.Parameter(
            torch.zeros(num_router_experts, hidden_dim, dtype=dtype, device=device),
            requires_grad=False,
        )
        # float32 whatever the model dtype: the mapping is applied to float32 probabilities.
        self.router_map = nn.Parameter(
            torch.zeros(keep, num_router_experts, dtype=torch.float32, device=device),
            requires_grad=False,
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Route tokens to the k slots: (original E-wide logits, top-k weights, top-k slots)."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = router_logits(hidden_states, self.weight, self.routing)  # [T, E]
        weights, index = route(logits, self.routing, self.top_k, router_map=self.router_map)
        return logits, weights, index

    def extra_repr(self) -> str:
        r = self.routing
        return (
            f"experts={self.num_router_experts} -> slots={self.num_experts}, top_k={self.top_k}, "
            f"renormalize={r.renormalize}, scaling_factor={r.scaling_factor}, "
            f"topk_method={r.topk_method}, n_group={r.n_group}, topk_group={r.topk_group}"
        )
