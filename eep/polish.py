"""Gradient polishing: tune a candidate's R and M by Adam on KL(full || candidate), experts frozen.

A search (EEP, NAEE, ...) hands over a candidate; polishing moves its coefficients downhill on the
teacher-forced KL of the `kl` fitness (`eep.forced`): the full model's next-token distributions over
prompt + gold answer rows (a task split) or calibration texts, coarsened to its top `kl_top` tokens
plus the rest. The expert and gate weights never change and never get gradients: per MoE layer l
the model runs with

    experts   W'_l = M_l @ W_l           (originals detached; float32 M cast to the weights' dtype)
    router    probs:  router_map = R_l   (a `ProbabilityMappedRouter`, even for one-hot R)
              logits: gate = R_l @ G_l   (and R_l @ b_l for DeepSeek-V3's score-correction bias)

passed to `torch.func.functional_call` as overrides of the surgery-installed tensors, so only the
k_l merged weights per layer join the autograd graph. The top-k choice is not differentiable (the
indices); the chosen weights are, and reach R. In `probs` mode R is kept above min(its start, 0)
after every step (projected Adam): slot scores R p renormalised over the chosen slots blow up when
new negative entries bring their sum near 0 (measured: unprojected, R diverges at lr 0.01).

Rows come in a seeded random order, `batch_size` per Adam step, cycling, until `steps` or
`max_seconds`. `kl_before`/`kl_after` are the mean KL over all rows, without grad, as the `kl`
fitness computes it (on a split: by an `Evaluator` with fitness "kl"). When the final coefficients
do not lower it, the original candidate comes back (`improved` False). Campaigns and `eep polish
--task` also check the task's dev split (`keep_polished`).

Refused: tuning R in `probs` mode where the probability mapping is undefined (sigmoid routers,
DeepSeek-V3): polishing then tunes M only and says so (`PolishOutcome.tuned`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from eep.candidate import Candidate
from eep.config import PolishSettings
from eep.fitness import Evaluator, left_padded, surgery_for
from eep.forced import Reference, kl_per_row, position_kl
from eep.models.loading import LoadedModel
from eep.models.skipping import set_skipping, skip_thresholds_of
from eep.models.surgery import Surgery
from eep.oneshot.calibration import CalibrationError, CalibrationSpec, build_calibration

log = logging.getLogger(__name__)

TUNABLE: tuple[str, ...] = ("merge", "router")


@dataclass
class PolishOutcome:
    """What a polishing run returns.

    `candidate` is the one to use: the polished coefficients (phase "polish", parents = the
    original's id) when they lowered the KL, else the original (`improved` False). `kl_after` is
    `candidate`'s KL, `kl_polished` that of the final coefficients whether kept or not (`polished`).
    """

    candidate: Candidate
    kl_before: float
    kl_after: float
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)  # training loss (batch mean KL) per step
    improved: bool = False
    kl_polished: float = float("nan")
    tuned: tuple[str, ...] = ()
    polished: Candidate | None = None
    step_seconds: float = 0.0  # the Adam steps alone (no reference, no measuring)


def keep_polished(original_score: float, polished_score: float, kl_lowered: bool) -> bool:
    """The dev-split rule: keep the polished candidate only when it beats the original on
    (dev score, then KL): a higher dev score, or the same one with a lower KL.

    Ties go to the lower KL because the original's dev score is the best of a dev re-ranking
    (biased upwards) and a small dev split ties often; docs/benchmarks.md measures the rule.
    """
    if polished_score != original_score:
        return polished_score > original_score
    return kl_lowered


# ----------------------------------------------------------------------------------- rows


class KLRows(ABC):
    """Teacher-forced token rows of one model and the full model's distributions over them."""

    loaded: LoadedModel
    surgery: Surgery

    @abstractmethod
    def __len__(self) -> int:
        """Number of rows."""

    @abstractmethod
    def batch(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[Reference]]:
        """Model inputs (left-padded rows, as the Evaluator builds them) and each row's reference."""

    @abstractmethod
    def mean_kl(self, candidate: Candidate) -> float:
        """Mean KL(full || candidate) over all rows, as the `kl` fitness computes it (no grad)."""


class SplitRows(KLRows):
    """A task split's examples as prompt + gold continuation rows, the `kl` fitness' own rows.

    An evaluator with fitness "kl" and the same `kl_top` is used as it is (its reference is
    reused); any other gets a "kl" sibling on the same model replica and split, which leaves the
    given evaluator's state alone.
    """

    def __init__(self, evaluator: Evaluator, kl_top: int) -> None:
        if evaluator.fitness == "kl" and evaluator.kl_top == kl_top:
            judge = evaluator
        else:
            judge = Evaluator(
                evaluator.loaded,
                evaluator.spec,
                evaluator.split,
                batch_size=evaluator.batch_size,
                max_examples=len(evaluator.examples),
                fitness="kl",
                kl_top=kl_top,
            )
        self.judge = judge
        self.loaded = judge.loaded
        self.surgery = judge.surgery
        # The judge's tokenized rows (prompt + gold ids), in split order.
        self.items = sorted((it for b in judge._batches for it in b.items), key=lambda it: it.index)
        self._refs: list[Reference] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[Reference]]:
        """The judge's collation of the rows and their references."""
        refs = self._references()
        b = self.judge._collate([self.items[i] for i in indices])
        return _inputs(b.input_ids, b.attention_mask, b.position_ids), [refs[i] for i in indices]

    def mean_kl(self, candidate: Candidate) -> float:
        """Minus the judge's `kl` fitness score."""
        return -self.judge.evaluate(candidate).score

    def _references(self) -> list[Reference]:
        if self._refs is None:
            if self.judge._reference is None:
                with torch.no_grad():
                    self.judge._build_reference()
            # The judge builds them under inference mode; autograd cannot save such tensors.
            self._refs = [_normal(self.judge._reference[it.index]) for it in self.items]
        return self._refs


class CalibrationRows(KLRows):
    """Calibration texts (`eep.oneshot.calibration`) as rows; `batch_size` rows per measuring forward."""

    def __init__(
        self, loaded: LoadedModel, spec: CalibrationSpec, kl_top: int, batch_size: int
    ) -> None:
        calibration = build_calibration(spec, loaded.model, loaded.tokenizer)
        rows = []
        for b in calibration:
            for ids, mask in zip(b.input_ids, b.attention_mask, strict=True):
                real = ids[mask.bool()].tolist()
                if len(real) >= 2:  # one token predicts nothing
                    rows.append(real)
        if not rows:
            raise CalibrationError(f"calibration {spec.describe()}: no text of 2 tokens or more")
        self.loaded = loaded
        self.surgery = surgery_for(loaded.model)
        self.rows = rows
        self.kl_top = kl_top
        self.description = calibration.description
        tokenizer = loaded.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.device = loaded.model.get_input_embeddings().weight.device
        # Measuring batches: longest rows first, as the Evaluator plans them.
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        self._plan = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self._refs: list[Reference] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        """Tokens over all rows."""
        return sum(len(r) for r in self.rows)

    def batch(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[Reference]]:
        """Left-padded rows (positions count real tokens only) and their references."""
        refs = self._references()
        return self._inputs(indices), [refs[i] for i in indices]

    @torch.no_grad()
    def mean_kl(self, candidate: Candidate) -> float:
        """Mean over rows of `kl_per_row`, the candidate applied as the Evaluator applies it."""
        refs = self._references()
        model = self.loaded.model
        self.surgery.apply(candidate)
        set_skipping(model, skip_thresholds_of(candidate))
        values = []
        for chunk in self._plan:
            inputs = self._inputs(chunk)
            logits = model(**inputs).logits
            values += kl_per_row(logits, inputs["attention_mask"], [refs[i] for i in chunk])
        return sum(values) / len(values)

    def _inputs(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        padded = left_padded([self.rows[i] for i in indices], self.pad_id)
        return _inputs(*(t.to(self.device) for t in padded))

    @torch.no_grad()
    def _references(self) -> list[Reference]:
        if self._refs is None:
            model = self.loaded.model
            self.surgery.restore()
            set_skipping(model, None)
            refs: list[Reference | None] = [None] * len(self.rows)
            for chunk in self._plan:
                inputs = self._inputs(chunk)
                logits = model(**inputs).logits
                for row, i in enumerate(chunk):
                    refs[i] = Reference.of_row(
                        logits[row], inputs["attention_mask"][row], self.kl_top
                    )
            self._refs = refs  # type: ignore[assignment]
        return self._refs  # type: ignore[return-value]


def _inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> dict:
    """The forward's keyword arguments, as `Evaluator._full_logits` passes them."""
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )


def _normal(ref: Reference) -> Reference:
    """A copy of a reference made of normal (not inference-mode) tensors."""
    return Reference(ref.top_logprobs.clone(), ref.top_index.clone(), ref.rest_logprob.clone())


# ----------------------------------------------------------------------------------- the model


class DifferentiableCandidate:
    """A candidate installed in its model with R and M as differentiable leaves.

    Built inside `frozen(surgery)`: surgery applies the candidate (with mapped routers in `probs`
    mode when R is tuned), then `logits(inputs)` runs the model with every tuned layer's merged
    experts and router coefficients computed from the leaves. At the candidate's own coefficients
    it computes what the Evaluator computes for it (one-hot R: the mapped router instead of the
    sliced gate, equal up to float rounding).
    """

    def __init__(self, surgery: Surgery, candidate: Candidate, tune: Sequence[str]) -> None:
        unknown = sorted(set(tune) - set(TUNABLE))
        if unknown:
            raise ValueError(f"tune: unknown {unknown}; choose from {list(TUNABLE)}")
        self.surgery = surgery
        self.candidate = candidate
        self.tune = tuple(t for t in TUNABLE if t in tune)
        self.logits_mode = candidate.router_mapping == "logits"
        surgery.apply(candidate, mapped_router="router" in self.tune)
        set_skipping(surgery.model, skip_thresholds_of(candidate))
        names = {id(module): name for name, module in surgery.model.named_modules()}
        self._experts = [names[id(layer.experts)] for layer in surgery.layers]
        self._gates = [names[id(layer.block.gate)] for layer in surgery.layers]
        devices = [layer.experts.gate_up_proj.device for layer in surgery.layers]

        def leaves(mats: list[torch.Tensor], tuned: bool) -> list[torch.Tensor]:
            return [
                m.detach().to(d, torch.float32).clone().requires_grad_(tuned)
                for m, d in zip(mats, devices, strict=True)
            ]

        self.merge = leaves(candidate.expert_merge, "merge" in self.tune)
        self.router = leaves(candidate.router_map, "router" in self.tune)
        # probs mode: slot scores are R p, renormalised over the chosen slots; an entry pushed
        # below 0 can bring that sum near 0 and the weights blow up (measured: Adam on R alone
        # then diverges). So R may not go below min(its start, 0): no new negative entries, and
        # a candidate that starts with some (EEP's R) is not moved at step 0.
        self._router_floor = (
            [r.detach().clamp(max=0) for r in self.router]
            if "router" in self.tune and not self.logits_mode
            else []
        )

    @torch.no_grad()
    def project(self) -> None:
        """Put R back above its floor (probs mode; see `__init__`): after every optimizer step."""
        for r, floor in zip(self.router, self._router_floor, strict=False):  # [] unless R moves
            torch.maximum(r, floor, out=r)

    def parameters(self) -> list[torch.Tensor]:
        """The tuned leaves (float32, one per layer and kind)."""
        return [t for t in (*self.merge, *self.router) if t.requires_grad]

    def overrides(self) -> dict[str, torch.Tensor]:
        """The tensors that replace the installed ones, by parameter (or buffer) name."""
        out: dict[str, torch.Tensor] = {}
        for i, orig in enumerate(self.surgery._originals):
            experts, gate = self._experts[i], self._gates[i]
            device = self.merge[i].device
            if "merge" in self.tune:
                out[f"{experts}.gate_up_proj"] = _merged(self.merge[i], orig.gate_up, device)
                out[f"{experts}.down_proj"] = _merged(self.merge[i], orig.down, device)
            if "router" in self.tune:
                if self.logits_mode:
                    # Surgery's stock gate G' = R @ G, combined in float32 as `_combine` does.
                    out[f"{gate}.weight"] = _merged(
                        self.router[i], orig.gate_weight, device, float32=True
                    )
                    if orig.score_bias is not None:
                        out[f"{gate}.e_score_correction_bias"] = _merged(
                            self.router[i], orig.score_bias, device, float32=True
                        )
                else:
                    out[f"{gate}.router_map"] = self.router[i]
        return out

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits for `inputs` with the current coefficients (differentiable in them)."""
        return functional_call(self.surgery.model, self.overrides(), (), inputs).logits

    def current(self, **meta: object) -> Candidate:
        """The current coefficients as a candidate (the original's shapes, mode and top-k)."""
        c = self.candidate
        return Candidate(
            router_map=[t.detach().cpu() for t in self.router],
            expert_merge=[t.detach().cpu() for t in self.merge],
            num_experts=c.num_experts,
            top_k=c.top_k,
            router_mapping=c.router_mapping,
            model_id=c.model_id,
            **meta,  # type: ignore[arg-type]
        )


def _merged(
    coeffs: torch.Tensor, source: torch.Tensor, device: torch.device, float32: bool = False
) -> torch.Tensor:
    """coeffs @ source over the first axis: in the source's dtype, or float32 then cast back."""
    source = source.detach().to(device)
    keep, num = coeffs.shape
    if float32:
        flat = coeffs @ source.float().reshape(num, -1)
    else:
        flat = coeffs.to(source.dtype) @ source.reshape(num, -1)
    return flat.reshape(keep, *source.shape[1:]).to(source.dtype)


@contextmanager
def frozen(surgery: Surgery) -> Iterator[None]:
    """No model tensor requires grad inside (the originals included); the flags come back after."""
    params = {id(p): p for p in surgery.model.parameters()}
    for orig in surgery._originals:
        for p in (orig.gate_weight, orig.gate_up, orig.down):
            params[id(p)] = p
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def kl_loss(
    logits: torch.Tensor, attention_mask: torch.Tensor, refs: Sequence[Reference]
) -> torch.Tensor:
    """Differentiable mean over rows of `eep.forced.kl_per_row` (the same coarsened KL)."""
    terms = []
    for row, ref in enumerate(refs):
        kl = position_kl(logits[row], attention_mask[row], ref)
        # A row with nothing to predict counts 0, as in kl_per_row.
        terms.append(kl.mean() if kl.numel() else kl.sum())
    return torch.stack(terms).mean()


def _finite(loss: torch.Tensor, leaves: Sequence[torch.Tensor]) -> bool:
    """Whether the loss and every leaf's gradient are finite."""
    tensors = [loss.detach(), *(t.grad for t in leaves if t.grad is not None)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _row_batches(count: int, size: int, seed: int) -> Iterator[list[int]]:
    """Batches of `size` row indices from seeded random permutations of the rows, cycling."""
    generator = torch.Generator().manual_seed(seed)
    size = min(size, count)
    pending: list[int] = []
    while True:
        while len(pending) < size:
            pending += torch.randperm(count, generator=generator).tolist()
        yield pending[:size]
        pending = pending[size:]


# ----------------------------------------------------------------------------------- polishing


def tuned_kinds(surgery: Surgery, candidate: Candidate, asked: Sequence[str]) -> tuple[str, ...]:
    """The coefficient kinds polishing can move for this model and candidate (see module docstring)."""
    tune = [t for t in TUNABLE if t in asked]
    if "router" in tune and candidate.router_mapping == "probs":
        refusal = surgery.routing.mapping_refusal()
        if refusal is not None:
            tune.remove("router")
            if not tune:
                raise ValueError(
                    f"polish tune={list(asked)}: {surgery.family.name}: {refusal}; tune 'merge' "
                    "or polish a router_mapping='logits' candidate"
                )
            log.warning("%s: %s; polishing tunes merge only", surgery.family.name, refusal)
    return tuple(tune)


def polish(rows: KLRows, candidate: Candidate, settings: PolishSettings) -> PolishOutcome:
    """Polish `candidate` on `rows` (see the module docstring); the model is restored after."""
    start = time.perf_counter()
    surgery = rows.surgery
    model = surgery.model
    surgery.check(candidate)
    tune = tuned_kinds(surgery, candidate, settings.tune)
    history: list[float] = []
    try:
        kl_before = rows.mean_kl(candidate)
        with frozen(surgery):
            coefficients = DifferentiableCandidate(surgery, candidate, tune)
            optimizer = torch.optim.Adam(coefficients.parameters(), lr=settings.lr)
            batches = _row_batches(len(rows), settings.batch_size, settings.seed)
            loop_start = time.perf_counter()
            for _ in range(settings.steps):
                inputs, refs = rows.batch(next(batches))
                loss = kl_loss(coefficients.logits(inputs), inputs["attention_mask"], refs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not _finite(loss, coefficients.parameters()):
                    # A step on NaN/inf would poison every coefficient: stop at the last good ones.
                    log.warning(
                        "polish: non-finite loss or gradient at step %d; stopped", len(history)
                    )
                    break
                optimizer.step()
                coefficients.project()
                history.append(float(loss.detach()))
                if (
                    settings.max_seconds is not None
                    and time.perf_counter() - loop_start >= settings.max_seconds
                ):
                    break
            step_seconds = time.perf_counter() - loop_start
            polished = coefficients.current()
        kl_polished = rows.mean_kl(polished)
    finally:
        set_skipping(model, None)
        surgery.restore()
    improved = kl_polished < kl_before
    seconds = time.perf_counter() - start
    record = {
        "steps": len(history),
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "tune": list(tune),
        "kl_top": settings.kl_top,
        "kl_before": kl_before,
        "kl_after": kl_polished,
        "seconds": round(seconds, 3),
    }
    polished = polished.with_meta(
        phase="polish",
        parents=(candidate.id,) if candidate.id else (),
        id="",
        extra={**candidate.extra, "polish": record},
    )
    return PolishOutcome(
        candidate=polished if improved else candidate,
        kl_before=kl_before,
        kl_after=kl_polished if improved else kl_before,
        steps=len(history),
        seconds=seconds,
        history=history,
        improved=improved,
        kl_polished=kl_polished,
        tuned=tune,
        polished=polished,
        step_seconds=step_seconds,
    )


def polish_on_split(
    evaluator: Evaluator, candidate: Candidate, settings: PolishSettings
) -> PolishOutcome:
    """Polish on the evaluator's split (prompt + gold rows); any fitness kind, its state kept."""
    return polish(SplitRows(evaluator, settings.kl_top), candidate, settings)


def polish_on_calibration(
    loaded: LoadedModel, candidate: Candidate, spec: CalibrationSpec, settings: PolishSettings
) -> PolishOutcome:
    """Polish on calibration texts (`eep prune --calibration` specs)."""
    rows = CalibrationRows(loaded, spec, settings.kl_top, settings.batch_size)
    return polish(rows, candidate, settings)
