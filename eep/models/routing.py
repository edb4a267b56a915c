"""The EEP authors' router mapping: a linear map on routing probabilities, before top-k.

With gate G [E, d] unchanged and router map R [k, E], for tokens x:
    p  = softmax(x G^T)            over all E original experts, float32   [T, E]
    p' = p R^T                     scores of the k kept slots             [T, k]
    top-k over p', then divide the chosen scores by their sum.
This is the authors' patched Mixtral block (reference/eep.md 1.2). For a family that does not
renormalise its top-k weights (Qwen/OLMoE without `norm_topk_prob`) we divide p' by its sum over
the k slots instead, so that a one-hot R gives exactly what that family's pruned model computes
(softmax over the kept experts' logits); for Mixtral nothing changes.

A non-one-hot R has no stock equivalent, so exported checkpoints carry this module (see
`eep.models.mapped`). The module answers the same contract as transformers' routers:
`forward(hidden) -> (router_logits, top_k_weights, top_k_index)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProbabilityMappedRouter(nn.Module):
    """Router of k slots scored as R @ softmax(G x); G stays the original [E, d] gate."""

    def __init__(
        self,
        hidden_dim: int,
        num_router_experts: int,
        keep: int,
        top_k: int,
        renormalize: bool,
        cast_weights: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_router_experts = num_router_experts
        self.num_experts = keep
        self.top_k = top_k
        self.renormalize = renormalize
        self.cast_weights = cast_weights
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
        router_logits = F.linear(hidden_states, self.weight)  # [T, E]
        probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
        mapped = probs @ self.router_map.to(probs.device).t()  # [T, k]
        if not self.renormalize:
            mapped = mapped / mapped.sum(dim=-1, keepdim=True)
        top_value, top_index = torch.topk(mapped, self.top_k, dim=-1)  # [T, top_k]
        if self.renormalize:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        if self.cast_weights:
            top_value = top_value.to(router_logits.dtype)
        return router_logits, top_value, top_index

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_router_experts} -> slots={self.num_experts}, top_k={self.top_k}, "
            f"renormalize={self.renormalize}"
        )
