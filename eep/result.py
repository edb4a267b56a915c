"""What one evaluation of a candidate returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class FitnessResult:
    """A candidate's score on one task split, with enough detail to audit it.

    `score` is the primary metric (named by `metric`, in 0..1, higher is better); `metrics` holds
    every metric computed (e.g. acc and acc_norm, exact_match and f1). `hits` is the per-example
    value of the primary metric, in the split's example order. A failed evaluation has `error`
    set and `score` = nan.

    `fitness` names what was measured: "accuracy" (the task's metric), "likelihood" (metric
    `loglik`: mean log-probability of the gold answer tokens, nats, <= 0) or "kl" (metric
    `neg_kl`: minus the mean KL divergence from the full model, <= 0). A `rejected` evaluation
    stopped early (`eep.rejection`): `count` examples of `total` were scored, `score` and `hits`
    are theirs, and `bound` is the confidence bound on the full-split score that lost to
    `reject_below`.
    """

    score: float
    metric: str
    hits: list[float] = field(default_factory=list)
    count: int = 0
    seconds: float = 0.0
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    split: str = ""
    error: str | None = None
    fitness: str = "accuracy"
    total: int = 0  # examples in the split (count < total only when rejected)
    rejected: bool = False
    reject_below: float | None = None
    bound: float | None = None

    @property
    def failed(self) -> bool:
        """True when the evaluation raised instead of producing a score."""
        return self.error is not None

    @property
    def tokens_per_second(self) -> float:
        """Tokens processed (prompt + generated) per second of evaluation."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def failure(cls, message: str, metric: str = "", split: str = "") -> FitnessResult:
        """A result recording that the evaluation raised `message`."""
        return cls(score=float("nan"), metric=metric, split=split, error=message)

    def to_dict(self, with_hits: bool = True) -> dict:
        """JSON-ready form (hits optional: they can be long)."""
        out = asdict(self)
        out["tokens_per_second"] = self.tokens_per_second
        if not with_hits:
            out.pop("hits")
        return out
