"""One-shot expert pruning (NAEE, frequency, soft activation, REAP, random) and NAEE dynamic skipping.

`oneshot_prune` is the library call behind `eep prune`: load the model, build the calibration
data, run the method, return an ordinary `Candidate` (phase "oneshot", `extra["method"]`), with
skipping thresholds calibrated on the pruned model when asked. `seed_candidates` resolves a
campaign's `init_from` entries: candidate files, or method names run on the task's search split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eep.candidate import Candidate
from eep.models.families import detect_family, get_num_experts, model_shape, moe_layers
from eep.models.loading import LoadedModel, load_config, load_model
from eep.models.surgery import Surgery
from eep.oneshot.calibration import (
    Calibration,
    CalibrationSpec,
    build_calibration,
    parse_calibration,
    task_calibration,
)
from eep.oneshot.criteria import CRITERIA, CriteriaScores, criteria_scores, random_candidate
from eep.oneshot.naee import DEFAULT_MAX_SUBSETS, NAEEResult, naee_prune
from eep.oneshot.skipping import DEFAULT_QUANTILE, calibrate_thresholds, with_skip_thresholds
from eep.search.budget import KeepBudget

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("naee", *CRITERIA, "random")

__all__ = [
    "METHODS",
    "Calibration",
    "CalibrationSpec",
    "OneShotResult",
    "oneshot_prune",
    "parse_calibration",
    "seed_candidates",
    "task_calibration",
]


@dataclass
class OneShotResult:
    """A one-shot pruning and what it took."""

    candidate: Candidate
    seconds: float
    calibration_tokens: int = 0
    naee: NAEEResult | None = None
    scores: CriteriaScores | None = None
    skip_thresholds: list[float] | None = None


def oneshot_prune(
    model: str | LoadedModel,
    method: str,
    keep: int | KeepBudget,
    calibration: CalibrationSpec | None = None,
    *,
    order: str = "layerwise",
    beam_width: int = 1,
    max_subsets: int = DEFAULT_MAX_SUBSETS,
    seed: int = 0,
    top_k: int | None = None,
    skip: bool = False,
    skip_quantile: float = DEFAULT_QUANTILE,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> OneShotResult:
    """Prune `model` to `keep` experts per MoE layer (or a global budget) with `method`; see the module docstring."""
    if isinstance(keep, KeepBudget) and keep.is_uniform:
        keep = keep.low
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if calibration is None and (method != "random" or skip):
        raise ValueError(f"method {method!r}{' with skipping' if skip else ''} needs calibration data")
    budget = keep if isinstance(keep, KeepBudget) else None
    _check_arguments(model, budget.low if budget else keep, top_k, skip, skip_quantile, beam_width, max_subsets,
                     trust_remote_code, per_layer=budget is not None)
    start = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, trust_remote_code=trust_remote_code)
    net = loaded.model
    family = detect_family(net.config)
    refusal = budget.routing_refusal(family.routing(net.config)) if budget is not None else None
    if refusal is not None:
        raise ValueError(f"{loaded.spec}: {refusal}")
    num_layers = len(moe_layers(net))
    num_experts = get_num_experts(net.config, family)
    data = build_calibration(calibration, net, loaded.tokenizer) if calibration is not None else None
    described = {"calibration": data.description} if data is not None else {}
    naee: NAEEResult | None = None
    scores: CriteriaScores | None = None
    thresholds: list[float] | None = None
    if budget is not None:
        candidate, naee, scores = _budget_prune(net, data, method, budget, seed, loaded.spec, order, beam_width,
                                                 max_subsets, described)
    elif method == "random":
        candidate = random_candidate(num_layers, num_experts, keep, seed, model_id=loaded.spec)
    elif method == "naee":
        naee = naee_prune(net, data, keep, order=order, max_subsets=max_subsets, beam_width=beam_width)
        candidate = naee.candidate(loaded.spec, beam_width=beam_width, **described)
    else:
        scores = criteria_scores(net, data)
        candidate = scores.candidate(method, keep, loaded.spec, **described)
    if top_k is not None:
        candidate = candidate.with_meta(top_k=top_k)
    if skip:
        # The authors calibrate beta on the pruned model (Lu et al. 2024): apply, measure, restore.
        surgery = Surgery(net)
        surgery.apply(candidate)
        try:
            thresholds = calibrate_thresholds(net, data, skip_quantile)
        finally:
            surgery.restore()
        candidate = with_skip_thresholds(candidate, thresholds, skip_quantile)
    seconds = time.perf_counter() - start
    log.info("%s keep=%s: %s (%.1f s)", method, keep, candidate.kept_experts(), seconds)
    return OneShotResult(
        candidate=candidate,
        seconds=seconds,
        calibration_tokens=data.tokens if data is not None else 0,
        naee=naee,
        scores=scores,
        skip_thresholds=thresholds,
    )


def _budget_prune(
    net, data: Calibration | None, method: str, budget: KeepBudget, seed: int, model_id: str,
    order: str, beam_width: int, max_subsets: int, described: dict,
) -> tuple[Candidate, NAEEResult | None, CriteriaScores | None]:
    """A one-shot pruning under a global budget: per-layer counts from a criterion ranked across layers.

    Score criteria rank every expert by its share of its layer's score and keep the best `total`
    within the per-layer bounds. NAEE takes the counts REAP's ranking gives, then its own subset at
    each count (layers keeping fewer experts than top-k keep REAP's, NAEE's loss needs top-k of them).
    Random draws a random allocation, then random subsets.
    """
    extra = {"method": method, "budget": [budget.total, budget.low, budget.high], **described}
    if method == "random":
        kept = budget.random_kept(np.random.default_rng(seed))
        return Candidate.from_kept(kept, budget.num_experts, model_id=model_id, phase="oneshot",
                                   extra=extra | {"seed": seed}), None, None
    scores = criteria_scores(net, data)
    naee: NAEEResult | None = None
    if method != "naee":
        kept = budget.allocate_by_scores(scores.scores(method))
        extra["calibration_tokens"] = scores.tokens
    else:
        kept = budget.allocate_by_scores(scores.scores("reap"))
        top_k = int(moe_layers(net)[0].gate.top_k)
        extra["allocation"] = "reap"
        todo = {layer for layer, k in enumerate(kept) if len(k) >= top_k}
        # Smallest count first: a beam search answers for every larger count on its way down.
        for count in sorted({len(kept[layer]) for layer in todo}):
            if not any(len(kept[layer]) == count for layer in todo):
                continue
            naee = naee_prune(net, data, count, order=order, max_subsets=max_subsets, beam_width=beam_width)
            for layer in sorted(todo):
                found = naee.kept_at(layer, len(kept[layer]))
                if found is not None:
                    kept[layer] = found
                    todo.discard(layer)
        extra["calibration_tokens"] = data.tokens if data is not None else 0
    budget.check([len(k) for k in kept], f"{method} under a global budget")
    return Candidate.from_kept(kept, budget.num_experts, model_id=model_id, phase="oneshot", extra=extra), naee, scores


def _check_arguments(
    model: str | LoadedModel, keep: int, top_k: int | None, skip: bool, skip_quantile: float,
    beam_width: int, max_subsets: int, trust_remote_code: bool, per_layer: bool = False,
) -> None:
    """Refuse what the result would be refused for before the (long) pass over the data."""
    for name, value in (("keep", keep), ("top_k", top_k), ("beam_width", beam_width), ("max_subsets", max_subsets)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if skip and not 0.0 <= skip_quantile <= 1.0:
        raise ValueError(f"skip_quantile must be in 0..1, got {skip_quantile}")
    config = model.model.config if isinstance(model, LoadedModel) else load_config(model, trust_remote_code)
    shape = model_shape(config)
    if keep > shape.num_experts:
        raise ValueError(f"keep={keep} is more than the model's {shape.num_experts} experts per layer")
    active = top_k if top_k is not None else shape.top_k
    if keep < active and not per_layer:  # a global budget's small layers route to all they keep
        raise ValueError(
            f"keep={keep} is smaller than top_k={active}{'' if top_k else ' (the model routes each token to that many)'}: "
            "a token cannot use more experts than a layer keeps; keep more or pass a smaller --top-k"
        )


def seed_candidates(
    entries: Sequence[str],
    model: str,
    task: Any,
    keep: int | KeepBudget,
    out_dir: str | Path,
    top_k: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> list[Candidate]:
    """Candidates for a search's `init_from`: files as they are, method names run on `task`'s search split.

    A method's candidate is written to `out_dir/init_<method>.safetensors` and read back from
    there when it exists, so a resumed campaign does not recompute (or change) its seeds.
    """
    out_dir = Path(out_dir)
    loaded: LoadedModel | None = None
    out = []
    for entry in entries:
        if entry not in METHODS:
            if not Path(entry).is_file():
                raise ValueError(
                    f"init_from entry {entry!r} is neither a candidate file nor a one-shot method "
                    f"({', '.join(METHODS)})"
                )
            out.append(Candidate.load(entry))
            continue
        path = out_dir / f"init_{entry}.safetensors"
        if path.is_file():
            out.append(Candidate.load(path))
            continue
        if loaded is None:
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            loaded = load_model(model, device, dtype, trust_remote_code=trust_remote_code)
        spec = None if entry == "random" else task_calibration(task)
        result = oneshot_prune(loaded, entry, keep, spec, seed=seed, top_k=top_k)
        candidate = result.candidate.with_meta(id=f"init-{entry}")
        candidate.save(path)
        out.append(candidate)
    return out
