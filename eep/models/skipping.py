"""NAEE dynamic skipping at run time: run only a token's first expert when its second one's weight is small.

Rule (Lu et al. 2024, "Not All Experts are Equal", dynamic skipping), per MoE layer l with threshold beta_l, for a top-2 router
whose weights for a token are w_first >= w_second: skip the second expert iff
w_second < beta_l * w_first (strict). The ratio w_second / w_first is the same before and after
top-k renormalisation and scaling, so the rule reads the weights the router hands to the experts.
On a skip the first expert gets the weight the family's router gives a lone expert
(`eep.models.routing.sole_expert_weight`): 1.0 times the routed_scaling_factor for a family that
renormalises its top-k (Mixtral: the authors' rule), its own weight otherwise (that family never
rescaled the pair). The second expert is not computed for that token. Threshold 0 changes
nothing; threshold 1 skips every second expert whose weight is below the first's (all but ties).
The thresholds are computed in `eep.oneshot.skipping`.

Where it applies:
- In-process (`DynamicSkipping` / `set_skipping`): each MoE layer's experts module gets an
  instance-level `forward` (the same mechanism accelerate's hooks use) that splits the tokens into
  those running one expert and those running two and calls the module's own forward on each, so
  parameter names, the experts implementation and `Surgery` all keep working; `remove()` restores
  the module. Prefill and decode alike.
- The Evaluator: a candidate whose `extra["skip_thresholds"]` is set is scored with skipping on
  (`eep prune --skip` writes them).
- Exported checkpoints: the thresholds go into `config.json` as `eep_skip_thresholds` with
  `model_type: eep_<family>`; after `import eep`, `AutoModelForCausalLM.from_pretrained` builds
  eep's registered class, which installs the skipping (see `eep.models.mapped`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from eep.candidate import Candidate
from eep.models.families import MoELayer, Routing, detect_family, moe_layers
from eep.models.routing import sole_expert_weight

SKIP_KEY = "skip_thresholds"  # Candidate.extra key
CONFIG_FIELD = "eep_skip_thresholds"  # config.json field of exported checkpoints

_INSTALLED: weakref.WeakKeyDictionary[nn.Module, DynamicSkipping] = weakref.WeakKeyDictionary()


class SkippingError(ValueError):
    """Thresholds that do not fit the model, or a router skipping is not defined for."""


def skip_thresholds_of(candidate: Candidate | None) -> list[float] | None:
    """The candidate's skipping thresholds, or None when it has none."""
    if candidate is None:
        return None
    values = candidate.extra.get(SKIP_KEY)
    return None if values is None else [float(v) for v in values]


class _SkippingForward:
    """The experts module's forward with the second expert skipped below the threshold."""

    def __init__(self, experts: nn.Module, threshold: float, routing: Routing) -> None:
        # A weak reference: the module holds this object, which must not keep the module alive.
        self._experts = weakref.ref(experts)
        self.threshold = threshold
        self.routing = routing
        self.tokens = 0
        self.skipped: torch.Tensor | int = 0

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
        experts = self._experts()
        forward = type(experts).forward
        if top_k_weights.shape[-1] == 1:  # a layer keeping one expert: nothing to skip
            return forward(experts, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if top_k_weights.shape[-1] != 2:
            raise SkippingError(f"dynamic skipping needs top-2 routing, got top-{top_k_weights.shape[-1]}")
        first = top_k_weights.argmax(dim=-1, keepdim=True)  # [N, 1]
        w_first = top_k_weights.gather(1, first)  # [N, 1]
        w_second = top_k_weights.gather(1, 1 - first)
        skip = (w_second < self.threshold * w_first).squeeze(1)  # [N]
        self.tokens += int(skip.numel())
        self.skipped = self.skipped + skip.sum()  # a device tensor: no sync per call
        if self.threshold <= 0.0:
            return forward(experts, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        one_index = top_k_index.gather(1, first)
        one_weight = sole_expert_weight(w_first, self.routing)
        out = torch.zeros_like(hidden_states)
        both = ~skip
        if skip.any():
            out[skip] = forward(experts, hidden_states[skip], one_index[skip], one_weight[skip], *args, **kwargs).to(out.dtype)
        if both.any():
            out[both] = forward(experts, hidden_states[both], top_k_index[both], top_k_weights[both], *args, **kwargs).to(out.dtype)
        return out


class DynamicSkipping:
    """Dynamic skipping installed on a model's MoE layers; counts what it skipped."""

    def __init__(self, model: nn.Module, thresholds: Sequence[float]) -> None:
        family = detect_family(model.config)
        layers = moe_layers(model)
        if len(thresholds) != len(layers):
            raise SkippingError(
                f"{len(thresholds)} skipping thresholds for a model with {len(layers)} MoE layers"
            )
        check_top2(layers)
        routing = family.routing(model.config)
        self.thresholds = [float(t) for t in thresholds]
        self._installed: list[tuple[nn.Module, object | None, _SkippingForward]] = []
        for layer, threshold in zip(layers, self.thresholds, strict=True):
            hook = _SkippingForward(layer.experts, threshold, routing)
            previous = layer.experts.__dict__.get("forward")
            layer.experts.forward = hook
            self._installed.append((layer.experts, previous, hook))

    def remove(self) -> None:
        """Give every experts module its own forward back."""
        for experts, previous, hook in self._installed:
            if experts.__dict__.get("forward") is hook:
                if previous is None:
                    del experts.forward
                else:
                    experts.forward = previous
        self._installed = []

    @property
    def active(self) -> bool:
        """Whether the skipping is still installed."""
        return bool(self._installed)

    def reset_counts(self) -> None:
        """Zero the token and skip counters."""
        for _, _, hook in self._installed:
            hook.tokens, hook.skipped = 0, 0

    def layer_skip_rates(self) -> list[float]:
        """Per MoE layer, the share of tokens that ran one expert instead of two."""
        return [int(h.skipped) / h.tokens if h.tokens else 0.0 for _, _, h in self._installed]

    def skipped_fraction(self) -> float:
        """Skipped expert calls over the expert calls top-2 routing makes (all layers)."""
        tokens = sum(h.tokens for _, _, h in self._installed)
        skipped = sum(int(h.skipped) for _, _, h in self._installed)
        return skipped / (2 * tokens) if tokens else 0.0


def set_skipping(model: nn.Module, thresholds: Sequence[float] | None) -> DynamicSkipping | None:
    """Make `model` skip with `thresholds` (None: no skipping), replacing what was installed."""
    current = _INSTALLED.pop(model, None)
    if current is not None:
        current.remove()
    if thresholds is None:
        return None
    skipping = DynamicSkipping(model, thresholds)
    _INSTALLED[model] = skipping
    return skipping


def installed_skipping(model: nn.Module) -> DynamicSkipping | None:
    """The skipping `set_skipping` installed on `model`, if any."""
    return _INSTALLED.get(model)


def check_top2(layers: Sequence[MoELayer]) -> None:
    """Raise SkippingError unless the layers route every token to two experts.

    A layer keeping one expert (a global budget) routes with top-1 and has nothing to skip; the
    model's top-k is the largest of its layers'.
    """
    top_k = max(int(layer.gate.top_k) for layer in layers)
    if top_k != 2:
        raise SkippingError(f"dynamic skipping is defined for top-2 routing; this model uses top-{top_k}")
