"""The dashboard in a real headless Chromium: points, live updates, 100,000 evaluations, screenshots.

Artifacts (git-ignored) go to tests/artifacts/: dashboard.png, dashboard-wall-time.png,
dashboard-100k.png and render_time.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from fixtures.runs.synthetic import SyntheticRun

from eep.dashboard import start_dashboard

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts"
# Without the background-networking flags Chromium keeps dialling out.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
RENDER_LIMIT_MS = 2000


def find_browser() -> str | None:
    """Debian's chromium first (what `make browser` installs), then whatever is on PATH."""
    candidates = [os.environ.get("EEP_CHROMIUM"), "/usr/bin/chromium"]
    candidates += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[dev]'")
    executable = find_browser()
    if executable is None:
        pytest.skip("NO BROWSER FOUND: the dashboard's browser test did not run. Install Chromium "
                    "(`make browser`, i.e. apt-get install -y chromium chromium-driver) or set EEP_CHROMIUM.")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    # The page's CSP forbids eval; Playwright's wait_for_function needs it, so the test bypasses it.
    context = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    assert not errors, f"the page reported errors: {errors}"


# Pixel statistics of every canvas matching a selector, computed in the page: an FNV-1a digest of
# the RGBA bytes, the pixels with ink (not transparent, not near-white), and per target colour
# the pixels within `tol` of it on every channel.
CANVAS_STATS = """([selector, targets, tol]) => {
  const out = { canvases: 0, pixels: 0, ink: 0, digest: 2166136261, near: {} };
  for (const name of Object.keys(targets)) out.near[name] = 0;
  for (const canvas of document.querySelectorAll(selector)) {
    out.canvases += 1;
    const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    out.pixels += d.length / 4;
    for (let i = 0; i < d.length; i += 4) {
      for (let k = 0; k < 4; k++) out.digest = Math.imul(out.digest ^ d[i + k], 16777619) >>> 0;
      if (d[i + 3] > 0 && Math.min(d[i], d[i + 1], d[i + 2]) < 235) out.ink += 1;
      for (const [name, c] of Object.entries(targets)) {
        if (Math.abs(d[i] - c[0]) <= tol && Math.abs(d[i + 1] - c[1]) <= tol
            && Math.abs(d[i + 2] - c[2]) <= tol && d[i + 3] > 200) out.near[name] += 1;
      }
    }
  }
  return out;
}"""
# Scatter points are drawn at alpha 0.75 over a white plot (the merging band is nearly white):
# these are the phase colours of app.js blended that way.
POINT_COLOURS = {
    "prune": [round(0.75 * c + 0.25 * 255) for c in (0x2F, 0x6F, 0xDE)],
    "merge": [round(0.75 * c + 0.25 * 255) for c in (0xE8, 0x89, 0x0C)],
}


def canvas_stats(page, selector: str, targets: dict | None = None, tol: int = 14) -> dict:
    """Pixel statistics of the canvases matching `selector` (see CANVAS_STATS)."""
    stats = page.evaluate(CANVAS_STATS, [selector, targets or {}, tol])
    assert stats["canvases"] > 0, f"no canvas matches {selector!r}"
    return stats


def assert_not_blank(path: Path) -> None:
    """A screenshot with a real picture in it: many colours, no colour covering almost all of it."""
    import numpy as np
    from matplotlib.image import imread

    rgb = (imread(path)[..., :3] * 255).round().astype(np.uint32)
    packed = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel()
    _, counts = np.unique(packed, return_counts=True)
    assert len(counts) > 50, f"{path.name}: only {len(counts)} colours"
    assert counts.max() < 0.95 * packed.size, f"{path.name}: one colour covers the page"


def wait_points(page, n: int, timeout: float = 60_000) -> None:
    # Generous: switching runs re-fetches and redraws the run, which took over 20 s with a
    # benchmark and the rest of the suite sharing the 2 cores (this file alone passes in 25 s).
    page.wait_for_function(f"() => document.getElementById('fitness').dataset.points === '{n}'",
                           timeout=timeout)


def test_live_page_shows_every_point_and_updates(tmp_path, page):
    live = SyntheticRun(tmp_path / "eep-mixtral-boolq", total_iter=399, start=time.time() - 600,
                        layers=8, num_experts=8, keep=4)
    live.append(240)
    other = SyntheticRun(tmp_path / "eep-seed1", total_iter=199, seed=1, start=time.time() - 600)
    other.append(200)
    other.finish()
    server, url = start_dashboard([live.path, other.path], port=0)
    try:
        page.goto(url)
        wait_points(page, 240)
        chart = page.locator("#fitness")
        first = canvas_stats(page, "#fitness", POINT_COLOURS)
        # both phases' points are on the canvas (merging starts at #201)
        assert first["near"]["prune"] > 50 and first["near"]["merge"] > 20, first
        assert first["ink"] > 3000, first
        assert chart.get_attribute("data-boundary") == str(live.discrete + 1)  # "#201"
        assert page.locator("#kpi-best").inner_text() == f"{live.best:.4f}"
        assert page.locator("#kpi-progress").inner_text() == "240 / 400"
        assert page.locator("#run-status").inner_text().lower() == "running"
        page.wait_for_function("() => document.getElementById('expert-map').dataset.layers === '8'")
        assert page.locator("#workers tbody tr").count() == 3
        assert page.locator("#compare").get_attribute("data-runs") == "2"
        assert page.locator("#final-card").is_hidden()

        box = chart.bounding_box()
        tips = []
        for i in range(24):  # hover: a tooltip names the evaluation under the mouse
            for j in range(10):
                page.mouse.move(box["x"] + 60 + i * (box["width"] - 80) / 24, box["y"] + 20 + j * 30)
                if page.locator("#tooltip").is_visible():
                    tips.append(page.locator("#tooltip").inner_text())
        assert tips and all(t.startswith("#") and "eep-" in t and "score" in t for t in tips), tips[:3]
        page.mouse.move(0, 0)

        live.append(25, wall=True)  # the campaign goes on: no reload
        wait_points(page, 265)
        assert page.locator("#kpi-progress").inner_text() == "265 / 400"
        assert page.locator("#kpi-best").inner_text() == f"{live.best:.4f}"
        time.sleep(0.5)
        by_index = canvas_stats(page, "#fitness", POINT_COLOURS)
        assert by_index["digest"] != first["digest"], "new evaluations did not change the drawing"
        assert by_index["near"]["merge"] > first["near"]["merge"], "25 more merging points"
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert_not_blank(ARTIFACTS / "dashboard.png")

        # The best candidate is a merged one (M != R): the two matrices draw differently.
        merge_map = canvas_stats(page, "#expert-map canvas")
        assert merge_map["canvases"] == 8 and merge_map["ink"] > 0
        page.click("#x-time")
        page.click("#m-router")
        time.sleep(0.3)
        by_time = canvas_stats(page, "#fitness", POINT_COLOURS)
        assert by_time["digest"] != by_index["digest"], "the x-axis toggle did not redraw"
        assert by_time["near"]["prune"] > 50 and by_time["near"]["merge"] > 20, by_time
        router_map = canvas_stats(page, "#expert-map canvas")
        assert router_map["canvases"] == 8
        assert router_map["digest"] != merge_map["digest"], "the M/R toggle did not redraw"
        page.screenshot(path=str(ARTIFACTS / "dashboard-wall-time.png"), full_page=True)
        assert_not_blank(ARTIFACTS / "dashboard-wall-time.png")
        page.click("#x-index")
        page.click("#m-merge")
        time.sleep(0.3)  # toggling back draws exactly the first pictures again
        assert canvas_stats(page, "#fitness", POINT_COLOURS)["digest"] == by_index["digest"]
        assert canvas_stats(page, "#expert-map canvas")["digest"] == merge_map["digest"]

        page.click("#runs button:nth-child(2)")  # the finished run
        wait_points(page, 200)
        page.wait_for_selector("#final-card:not([hidden])")
        assert page.locator("#run-status").inner_text().lower() == "finished"
        assert "EEP prune+merge" in page.locator("#final").inner_text()
        finished = canvas_stats(page, "#fitness", POINT_COLOURS)
        assert finished["digest"] != by_index["digest"] and finished["near"]["prune"] > 20
        page.screenshot(path=str(ARTIFACTS / "dashboard-finished.png"), full_page=True)
        assert_not_blank(ARTIFACTS / "dashboard-finished.png")
    finally:
        page.close()  # before the server goes: a poll into a closed port logs a console error
        server.shutdown()
        server.server_close()


def test_100k_evaluations_render_in_under_two_seconds(tmp_path, page):
    run = SyntheticRun(tmp_path / "big", total_iter=99_999, layers=32, keep=2)
    run.append(100_000)
    server, url = start_dashboard([run.path], port=0)
    try:
        started = time.perf_counter()
        server.runs.warm()  # what the server does in the background when it starts
        warm_s = time.perf_counter() - started
        timings = []
        for _ in range(2):  # the first load also pays for Chromium's cold caches
            page.goto(url)
            wait_points(page, 100_000, timeout=60_000)
            timings.append({k: float(page.locator("#fitness").get_attribute(f"data-{k}"))
                            for k in ("render-ms", "draw-ms", "drawn")})
        page.screenshot(path=str(ARTIFACTS / "dashboard-100k.png"), full_page=True)
        assert_not_blank(ARTIFACTS / "dashboard-100k.png")
        by_index = canvas_stats(page, "#fitness", POINT_COLOURS)
        assert by_index["ink"] > 10_000, by_index
        page.click("#x-time")
        time.sleep(0.2)
        toggled_ms = float(page.locator("#fitness").get_attribute("data-draw-ms"))
        assert canvas_stats(page, "#fitness")["digest"] != by_index["digest"]
    finally:
        page.close()  # before the server goes: a poll into a closed port logs a console error
        server.shutdown()
        server.server_close()
    result = {"evaluations": 100_000, "server_read_s": round(warm_s, 2), "loads": timings,
              "redraw_wall_time_ms": toggled_ms, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg()[0]}
    (ARTIFACTS / "render_time.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    best = min(t["render-ms"] for t in timings)
    assert best < RENDER_LIMIT_MS, f"100,000 evaluations took {best:.0f} ms to render: {result}"
    assert all(t["drawn"] < 100_000 for t in timings)  # binned: fewer marks than points
