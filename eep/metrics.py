"""Campaign metrics for Ray's dashboard and Prometheus/Grafana, recorded from the driver.

    eep_best_score           gauge    best search score so far            tags: campaign
    eep_evaluations_done     counter  evaluations scored                  tags: campaign, split
    eep_evaluations_failed   counter  evaluations that failed             tags: campaign, split
    eep_evaluation_seconds   histogram  seconds per evaluation            tags: campaign, split
    eep_workers              gauge    evaluation workers alive            tags: campaign

Ray exports them with its own `ray_` prefix. Without an initialised Ray (the in-process path),
every call is a no-op and Ray is never imported.
"""

from __future__ import annotations

import math
import sys
from typing import Any

_SECONDS_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800]
_REGISTRY: dict[str, Any] = {}  # one metric object per name and process (Ray keys them by name)


def ray_initialized() -> bool:
    """True when this process is connected to Ray (checked without importing it)."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **extra: Any) -> Any:
    if name not in _REGISTRY:
        from ray.util import metrics  # noqa: PLC0415  (only once Ray is up)

        cls = {"gauge": metrics.Gauge, "counter": metrics.Counter, "histogram": metrics.Histogram}[kind]
        _REGISTRY[name] = cls(name, description=description, tag_keys=tag_keys, **extra)
    return _REGISTRY[name]


class CampaignMetrics:
    """The campaign's Ray metrics; `observe` once per finished evaluation."""

    def __init__(self, campaign: str) -> None:
        self.campaign = campaign
        self.best = -math.inf
        self._metrics: dict[str, Any] | None = None

    @property
    def enabled(self) -> bool:
        """True once Ray is initialised (the metrics are created on first use after that)."""
        if self._metrics is None and ray_initialized():
            self._metrics = self._create()
        return self._metrics is not None

    def _create(self) -> dict[str, Any]:
        tags = ("campaign", "split")
        return {
            "best": _metric("gauge", "eep_best_score", "best search score so far", ("campaign",)),
            "done": _metric("counter", "eep_evaluations_done", "evaluations scored", tags),
            "failed": _metric("counter", "eep_evaluations_failed", "evaluations that failed", tags),
            "seconds": _metric("histogram", "eep_evaluation_seconds", "seconds per evaluation", tags,
                               boundaries=_SECONDS_BOUNDARIES),
            "workers": _metric("gauge", "eep_workers", "evaluation workers alive", ("campaign",)),
        }

    def observe(self, record: dict, workers: int) -> None:
        """Record one evaluation (a run-directory record) and the pool's current worker count."""
        score = _finite(record.get("score"))
        split = str(record.get("split", "search"))
        if split == "search" and score is not None and score > self.best:
            self.best = score
        if not self.enabled:
            return
        m = self._metrics
        assert m is not None
        tags = {"campaign": self.campaign, "split": split}
        failed = bool(record.get("error")) or score is None
        m["failed" if failed else "done"].inc(1, tags=tags)
        seconds = _finite(record.get("seconds"))
        if seconds is not None:
            m["seconds"].observe(seconds, tags=tags)
        m["workers"].set(workers, tags={"campaign": self.campaign})
        if math.isfinite(self.best):
            m["best"].set(self.best, tags={"campaign": self.campaign})


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
