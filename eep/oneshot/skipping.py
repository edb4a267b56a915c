"""NAEE dynamic skipping: the per-layer thresholds, calibrated on the model as it will run.

beta_l = median over calibration tokens of w_second / w_first (Lu et al. 2024, "Not All Experts
are Equal": the authors take the median), measured on the model as it will run (after pruning,
when stacking both), so about half of in-distribution tokens skip. Stored per MoE layer in order,
in a candidate's `extra["skip_thresholds"]`. The rule and its installation in a model are
`eep.models.skipping`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from eep.candidate import Candidate
from eep.models.families import moe_layers
from eep.models.skipping import SKIP_KEY, SkippingError, check_top2
from eep.oneshot.calibration import Calibration, stream_layer_calls

DEFAULT_QUANTILE = 0.5  # the authors' median


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile with linear interpolation (q = 0.5: numpy's median)."""
    ordered = values.flatten().double().sort().values
    if ordered.numel() == 0:
        raise SkippingError("no values to take a quantile of")
    pos = q * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return float(ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo]))


@torch.no_grad()
def routing_ratios(model: nn.Module, calibration: Calibration) -> list[torch.Tensor]:
    """Per MoE layer, w_second / w_first of every calibration token (float32, on the CPU)."""
    layers = moe_layers(model)
    check_top2(layers)
    ratios: list[list[torch.Tensor]] = [[] for _ in layers]

    def on_call(call) -> None:
        w = call.top_k_weights.float()
        first, second = w.max(dim=-1).values, w.min(dim=-1).values
        ratios[call.layer].append((second / first.clamp(min=torch.finfo(torch.float32).tiny)).cpu())

    stream_layer_calls(model, calibration, on_call)
    return [torch.cat(r) for r in ratios]


def calibrate_thresholds(model: nn.Module, calibration: Calibration, q: float = DEFAULT_QUANTILE) -> list[float]:
    """beta_l = q-quantile (median by default) of w_second / w_first over calibration tokens."""
    if not 0.0 <= q <= 1.0:
        raise SkippingError(f"quantile must be in [0, 1], got {q}")
    return [quantile(r, q) for r in routing_ratios(model, calibration)]


def with_skip_thresholds(candidate: Candidate, thresholds: Sequence[float], q: float = DEFAULT_QUANTILE) -> Candidate:
    """A copy of `candidate` that is scored and exported with dynamic skipping."""
    if len(thresholds) != candidate.num_layers:
        raise SkippingError(
            f"{len(thresholds)} thresholds for a candidate of {candidate.num_layers} MoE layers"
        )
    extra = {**candidate.extra, SKIP_KEY: [float(t) for t in thresholds], "skip_quantile": q}
    return candidate.with_meta(extra=extra)
