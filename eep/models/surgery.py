"""Apply a candidate to a loaded MoE model in place, from original weights cached once.

`Surgery(model)` takes the model's original router and expert tensors aside (by reference, no
copy) and gives every MoE layer working tensors of `keep` experts. `apply(candidate)` fills them:

    expert weights   W'[i] = sum_j M[i, j] * W[j]   one GEMM [k, E] x [E, rows*cols] per tensor
    gate (one-hot R or `logits` mode)   G' = R @ G  (one-hot R: an exact row slice)
    gate (`probs` mode, any other R)    a `ProbabilityMappedRouter` over the original G

Every result is computed from the originals with the same operations, so applying B after A is
bit-for-bit applying B to a freshly loaded model, and `restore()` puts the original tensors back.
After `apply` the model really holds `keep` experts per layer (plus the cached originals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from eep.candidate import Candidate, CandidateError
from eep.models.families import (
    MoEFamily,
    MoELayer,
    detect_family,
    get_num_experts,
    moe_layers,
    set_num_experts,
)
from eep.models.routing import ProbabilityMappedRouter


@dataclass
class _Originals:
    """One layer's original modules and tensors, as loaded."""

    gate: nn.Module
    gate_weight: nn.Parameter  # [E, d]
    score_bias: torch.Tensor | None  # DeepSeek-V3 e_score_correction_bias [E]
    gate_up: nn.Parameter  # [E, 2I, d]
    down: nn.Parameter  # [E, d, I]


@dataclass
class _Working:
    """One layer's preallocated tensors for a given keep."""

    keep: int
    gate_up: nn.Parameter  # [k, 2I, d]
    down: nn.Parameter  # [k, d, I]
    gate_weight: nn.Parameter  # [k, d]
    score_bias: torch.Tensor | None = None  # [k]
    mapped_router: ProbabilityMappedRouter | None = field(default=None, repr=False)


class Surgery:
    """Applies candidates to one model in place; `restore()` gives the original model back."""

    def __init__(self, model: nn.Module, originals_device: str | torch.device | None = None):
        self.model = model
        self.family: MoEFamily = detect_family(model.config)
        self.layers: list[MoELayer] = moe_layers(model)
        self.num_experts = get_num_experts(model.config, self.family)
        self.top_k = int(self.layers[0].gate.top_k)
        self.routing = self.family.routing(model.config)
        self._config_top_k = model.config.num_experts_per_tok
        # Originals may live elsewhere (host memory) to leave room on the GPU; merging then
        # streams one layer's originals at a time.
        self._originals_device = torch.device(originals_device) if originals_device else None
        self._devices = [layer.experts.gate_up_proj.device for layer in self.layers]
        self._originals = [self._take_originals(layer) for layer in self.layers]
        self._working: list[_Working | None] = [None] * len(self.layers)
        self.candidate: Candidate | None = None

    @property
    def num_layers(self) -> int:
        """Number of MoE layers."""
        return len(self.layers)

    # ------------------------------------------------------------------------- public
    def check(self, candidate: Candidate, mapped_router: bool = False) -> None:
        """Raise CandidateError when the candidate does not fit this model (see `apply`)."""
        candidate.validate(num_layers=self.num_layers, num_experts=self.num_experts)
        for layer, keep in enumerate(candidate.keep_per_layer):
            refusal = self.routing.keep_refusal(keep)
            if refusal is not None:
                raise CandidateError(
                    f"layers.{layer}: {self.family.name}'s grouped routing "
                    f"({self.routing.topk_method}): {refusal}"
                )
        refusal = self.routing.mapping_refusal()
        if self._uses_mapped_router(candidate, mapped_router) and refusal is not None:
            raise CandidateError(
                f"{self.family.name}: {refusal}; use router_mapping='logits' or one-hot "
                "router rows"
            )

    @torch.no_grad()
    def apply(
        self, candidate: Candidate, release_originals: bool = False, mapped_router: bool = False
    ) -> None:
        """Make the model compute `candidate`: merged experts, mapped router, top-k.

        `release_originals` drops each layer's originals once merged (export: peak memory is
        then the model plus one layer's merged experts, and the model cannot be restored).
        `mapped_router` installs `ProbabilityMappedRouter`s in `probs` mode even for one-hot R
        (the same function up to rounding): polishing needs an R in the model to tune.
        """
        if not self._originals:
            raise RuntimeError("this Surgery released its originals; load the model again")
        self.check(candidate, mapped_router)
        top_k = candidate.top_k or self.top_k
        mapped = self._uses_mapped_router(candidate, mapped_router)
        for i, (layer, orig) in enumerate(zip(self.layers, self._originals, strict=True)):
            merge, router_map = candidate.expert_merge[i], candidate.router_map[i]
            keep = merge.shape[0]
            # A layer keeping fewer experts than top_k routes every token to all of them.
            layer_top_k = min(top_k, keep)
            work = self._working_for(i, keep)
            _combine(merge, orig.gate_up, work.gate_up)
            _combine(merge, orig.down, work.down)
            layer.experts.gate_up_proj = work.gate_up
            layer.experts.down_proj = work.down
            layer.experts.num_experts = keep
            if mapped:
                router = self._mapped_router(i, work)
                router.router_map.copy_(router_map)
                router.top_k = layer_top_k
                layer.block.gate = router
            else:
                _combine(router_map, orig.gate_weight, work.gate_weight, float32=True)
                gate = orig.gate
                gate.weight = work.gate_weight
                if orig.score_bias is not None:
                    _combine(router_map, orig.score_bias, work.score_bias, float32=True)
                    gate.e_score_correction_bias = work.score_bias
                gate.num_experts = keep
                gate.top_k = layer_top_k
                layer.block.gate = gate
            if hasattr(layer.block, "top_k"):
                layer.block.top_k = layer_top_k
            if release_originals:
                # The model now holds the merged tensors; drop our references to the rest.
                self._originals[i] = None  # type: ignore[call-overload]
                self._working[i] = None
        if release_originals:
            self._originals = []
        set_num_experts(self.model.config, self.family, max(candidate.keep_per_layer))
        self.model.config.num_experts_per_tok = top_k
        self.candidate = candidate

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original routers and experts back (the working tensors stay allocated)."""
        for i, (layer, orig) in enumerate(zip(self.layers, self._originals, strict=True)):
            gate_up, down, gate_weight = orig.gate_up, orig.down, orig.gate_weight
            if self._originals_device is not None:
                device = self._devices[i]
                gate_up = nn.Parameter(gate_up.to(device), requires_grad=False)
                down = nn.Parameter(down.to(device), requires_grad=False)
                gate_weight = nn.Parameter(gate_weight.to(device), requires_grad=False)
            layer.experts.gate_up_proj = gate_up
            layer.experts.down_proj = down
            layer.experts.num_experts = self.num_experts
            orig.gate.weight = gate_weight
            if orig.score_bias is not None:
                orig.gate.e_score_correction_bias = orig.score_bias.to(gate_weight.device)
            orig.gate.num_experts = self.num_experts
            orig.gate.top_k = self.top_k
            layer.block.gate = orig.gate
            if hasattr(layer.block, "top_k"):
                layer.block.top_k = self.top_k
        set_num_experts(self.model.config, self.family, self.num_experts)
        self.model.config.num_experts_per_tok = self._config_top_k
        self.candidate = None

    # ------------------------------------------------------------------------- internals
    def _uses_mapped_router(self, candidate: Candidate, forced: bool = False) -> bool:
        if forced and candidate.router_mapping == "probs":
            return True
        return not candidate.router_has_stock_equivalent()

    def _take_originals(self, layer: MoELayer) -> _Originals:
        gate, experts = layer.gate, layer.experts
        bias = getattr(gate, "e_score_correction_bias", None)
        params = [gate.weight, experts.gate_up_proj, experts.down_proj]
        if self._originals_device is not None:
            params = [self._offload(p) for p in params]
            bias = None if bias is None else bias.to(self._originals_device)
        return _Originals(gate, params[0], bias, params[1], params[2])

    def _offload(self, param: nn.Parameter) -> nn.Parameter:
        data = param.detach().to(self._originals_device)
        if self._originals_device.type == "cpu" and torch.cuda.is_available():
            data = data.pin_memory()
        return nn.Parameter(data, requires_grad=False)

    def _working_for(self, i: int, keep: int) -> _Working:
        work = self._working[i]
        if work is not None and work.keep == keep:
            return work
        orig = self._originals[i]
        device = self._devices[i]

        def empty(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(
                torch.empty((keep, *t.shape[1:]), dtype=t.dtype, device=device),
                requires_grad=False,
            )

        # Normal tensors even when the first apply runs under the Evaluator's inference mode, so
        # a later apply outside it (no_grad) may still write into them.
        with torch.inference_mode(False):
            work = _Working(
                keep=keep,
                gate_up=empty(orig.gate_up),
                down=empty(orig.down),
                gate_weight=empty(orig.gate_weight),
                score_bias=None if orig.score_bias is None else empty(orig.score_bias).data,
            )
        self._working[i] = work
        return work

    def _mapped_router(self, i: int, work: _Working) -> ProbabilityMappedRouter:
        if work.mapped_router is None:
            orig = self._originals[i]
            with torch.inference_mode(False):  # as in _working_for
                router = self._new_mapped_router(orig, work)
            work.mapped_router = router
        return work.mapped_router

    def _new_mapped_router(self, orig: _Originals, work: _Working) -> ProbabilityMappedRouter:
        router = ProbabilityMappedRouter(
            hidden_dim=orig.gate_weight.shape[1],
            num_router_experts=self.num_experts,
            keep=work.keep,
            top_k=self.top_k,
            routing=self.routing,
            dtype=orig.gate_weight.dtype,
            device=work.gate_up.device,
        )
        # Share the original gate's storage: the mapping never changes G.
        router.weight = nn.Parameter(
            orig.gate_weight.data.to(work.gate_up.device), requires_grad=False
        )
        return router


def _combine(
    coeffs: torch.Tensor, source: torch.Tensor, out: torch.Tensor, float32: bool = False
) -> None:
    """out[i] = sum_j coeffs[i, j] * source[j], written into `out` without allocating it.

    One-hot coefficient rows are an exact row gather; otherwise one GEMM over the flattened
    tensors, in the weights' dtype (coefficients rounded to it) unless `float32` is asked for
    (small tensors: gate rows, score biases).
    """
    source = source.detach().to(out.device, non_blocking=True)
    keep, num = coeffs.shape
    rows = coeffs.to(out.device)
    one_hot = bool(((rows == 0) | (rows == 1)).all() and (rows.sum(dim=1) == 1).all())
    if one_hot:
        torch.index_select(source, 0, rows.argmax(dim=1), out=out.data)
    elif float32 or source.dtype == torch.float32:
        out.data.copy_((rows @ source.float().reshape(num, -1)).reshape(out.shape))
    else:
        torch.matmul(rows.to(source.dtype), source.reshape(num, -1), out=out.data.view(keep, -1))
