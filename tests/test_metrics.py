"""Campaign metrics: a no-op without Ray, recorded without error with a local Ray."""

from __future__ import annotations

import math
import os
import sys

import pytest

from eep.metrics import CampaignMetrics

RECORDS = [
    {"id": "eep-00000", "split": "search", "score": 0.25, "seconds": 1.5, "error": None},
    {"id": "eep-00001", "split": "search", "score": float("nan"), "seconds": 0.2, "error": "OOM"},
    {"id": "eep-00002", "split": "search", "score": 0.5, "seconds": 2.0, "error": None},
    {"id": "full", "split": "test", "score": 0.9, "seconds": 4.0, "error": None},
]


def test_without_ray_observe_is_a_no_op_and_never_imports_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now raises ImportError
    metrics = CampaignMetrics("c")
    metrics.observe({"split": "search", "score": 0.3, "seconds": 1.0}, workers=1)
    assert not metrics.enabled
    assert metrics.best == 0.3


def test_best_tracks_search_scores_only():
    metrics = CampaignMetrics("c")
    for record in RECORDS:
        metrics.observe(record, workers=2)
    assert metrics.best == 0.5  # the test score 0.9 and the failed NaN do not count


@pytest.mark.slow
def test_observe_with_a_local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        metrics = CampaignMetrics("ray-test")
        assert metrics.enabled
        for record in RECORDS:
            metrics.observe(record, workers=3)
        metrics.observe({"split": "search", "score": None, "error": "died"}, workers=2)
        assert metrics.best == 0.5 and not math.isinf(metrics.best)
    finally:
        if started:
            ray.shutdown()
