"""The dashboard's expert map for a per-layer budget: each layer shows its own kept slots.

The data side (`RunView.best`, `/api/runs/<run>/best`) runs everywhere; the drawing runs in a
headless Chromium like tests/test_dashboard_browser.py (skipped without one).
"""

from __future__ import annotations

import pytest
import torch
from fixtures.runs.synthetic import SyntheticRun
from test_dashboard import get_json, serve  # noqa: F401  (serve is a fixture)
from test_dashboard_browser import browser, page  # noqa: F401  (fixtures)

from eep.candidate import Candidate
from eep.dashboard import start_dashboard
from eep.dashboard.rundata import RunView

KEPT = [[3], [1, 5], [0, 2, 4, 7], [6, 7]]
KEEPS = [len(k) for k in KEPT]


def nonuniform_best(run: SyntheticRun) -> Candidate:
    """Overwrite the run's best candidate file with a merged candidate keeping 1, 2, 4, 2 experts."""
    base = Candidate.from_kept(KEPT, 8)
    g = torch.Generator().manual_seed(1)
    cand = Candidate(
        router_map=[r + 0.2 * torch.rand(r.shape, generator=g) for r in base.router_map],
        expert_merge=[m * 0.8 + 0.2 * torch.rand(m.shape, generator=g) for m in base.expert_merge],
        num_experts=8,
        phase="merge",
        id=run.best_id,
    )
    cand.save(run.path / "candidates" / f"{run.best_id}.safetensors")
    return cand


@pytest.fixture
def run(tmp_path) -> SyntheticRun:
    run = SyntheticRun(tmp_path / "budget", total_iter=59)
    run.append(60)
    run.finish()
    return run


def test_best_of_a_per_layer_budget_has_each_layers_own_rows(run, serve):
    cand = nonuniform_best(run)
    best = RunView(run.path).best()
    assert best["id"] == run.best_id and best["keep"] == KEEPS and best["num_experts"] == 8
    assert [len(layer["expert_merge"]) for layer in best["layers"]] == KEEPS
    assert [len(layer["router_map"]) for layer in best["layers"]] == KEEPS
    assert all(len(row) == 8 for layer in best["layers"] for row in layer["expert_merge"])
    assert best["kept"] == cand.kept_experts() == KEPT  # the dominant expert of every slot
    assert not best["pure_pruning"]
    served = get_json(serve(run.path), "/api/runs/budget/best")  # what the page reads
    assert served["keep"] == KEEPS and served["layers"] == best["layers"]


@pytest.mark.slow
def test_expert_map_draws_each_layer_with_its_own_row_count(run, page):  # noqa: F811
    nonuniform_best(run)
    server, url = start_dashboard([run.path], port=0)
    try:
        page.goto(url)
        page.wait_for_function("() => document.getElementById('expert-map').dataset.layers === '4'")
        # One canvas per layer, one cell row per kept slot (cells are 20 px for 8 experts).
        heights = page.eval_on_selector_all(
            "#expert-map canvas", "cs => cs.map(c => parseInt(c.style.height))"
        )
        assert heights == [20 * k for k in KEEPS]
        labels = page.eval_on_selector_all("#expert-map .name span", "ss => ss.map(s => s.textContent)")
        assert labels == [" · ".join(map(str, k)) for k in KEPT]
        assert "keep 1–4 of 8 per layer" in page.locator("#best-head").inner_text()
    finally:
        page.close()  # before the server goes: a poll into a closed port logs a console error
        server.shutdown()
        server.server_close()
