"""`eep report`: a self-contained report.html and fitness.png for one run directory.

The page has inline CSS, the PNG embedded as base64 and the expert map as inline SVG, so it can
be mailed or attached to a paper as one file. Both files go into the run directory (or `out_dir`);
nothing else there is touched.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

from eep.dashboard.rundata import RunView, finite
from eep.summary import chosen_method, method_rows

REPORT_FILE = "report.html"
FIGURE_FILE = "fitness.png"
COLOR = {"init": "#98a2b3", "prune": "#2f6fde", "merge": "#e8890c", "other": "#98a2b3",
         "best": "#6d28d9", "dev": "#12946b", "test": "#d1306b", "boundary": "#475467",
         "full": "#344054", "random": "#8a94a6"}
PHASE_LABEL = {"init": "initial population", "prune": "pruning", "merge": "merging", "other": "other"}


class ReportError(ValueError):
    """A report that cannot be written (e.g. matplotlib missing)."""


@dataclass
class ReportFiles:
    """Where the report went."""

    html: Path
    figure: Path


@dataclass
class _Curves:
    """The search records as plain lists, in the order they finished."""

    index: list[int]
    elapsed: list[float]
    score: list[float | None]
    phase: list[str]
    ids: list[str]
    boundary: int | None
    best_steps: list[int]  # indices where the best so far improved


def _curves(view: RunView) -> _Curves:
    cols = view.columns_since(0)["columns"]
    c = _Curves([], [], [], [], [], None, [])
    best = -math.inf
    for k, split in enumerate(cols["split"]):
        if split != "search":
            continue
        i = len(c.index)
        score = None if cols["failed"][k] else cols["score"][k]
        phase = cols["phase"][k] if cols["phase"][k] in PHASE_LABEL else "other"
        c.index.append(i + 1)
        c.elapsed.append(cols["elapsed"][k] or 0.0)
        c.score.append(score)
        c.phase.append(phase)
        c.ids.append(cols["id"][k])
        if phase == "merge" and c.boundary is None:
            c.boundary = i
        if score is not None and score > best:
            best = score
            c.best_steps.append(i)
    return c


def _references(summary: dict) -> dict[str, float | None]:
    """Full model and random-pruning test scores (summary.json first, else the records)."""
    refs: dict[str, float | None] = {"full": None, "random": None}
    tests = summary["held_out"].get("test", [])
    for row in tests:
        if row["id"] == "full":
            refs["full"] = row["score"]
    baselines = [r["score"] for r in tests if r.get("phase") == "baseline" and r["score"] is not None]
    if baselines:
        refs["random"] = sum(baselines) / len(baselines)
    # The summary's own rows win over the records (it is the number the table shows).
    for row in (summary.get("final") or {}).get("rows") or []:
        key = {"reference": "full", "baseline": "random"}.get(row["row"])
        if key is not None and finite(row.get("test")) is not None:
            refs[key] = row["test"]
    return refs


# --------------------------------------------------------------------------------- figure
def render_figure(view: RunView, path: Path) -> Path:
    """fitness.png: score of every search evaluation and the best so far, by evaluation and time."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportError("eep report draws with matplotlib: pip install 'eep[report]'") from exc
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    curves, summary = _curves(view), view.summary()
    refs = _references(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True, dpi=150, layout="constrained")
    minutes = max(curves.elapsed, default=0.0) >= 180
    scale = 60.0 if minutes else 1.0
    held = {split: [r for r in summary["held_out"].get(split, []) if r["at"] is not None and r["score"] is not None]
            for split in ("dev", "test")}
    for ax, by_time in zip(axes, (False, True), strict=True):
        xs = [e / scale for e in curves.elapsed] if by_time else curves.index
        many = len(xs) > 3000
        for phase in PHASE_LABEL:
            pts = [(x, y) for x, y, p in zip(xs, curves.score, curves.phase, strict=True)
                   if p == phase and y is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=3 if many else 9, alpha=0.5 if many else 0.75,
                           color=COLOR[phase], linewidths=0, label=PHASE_LABEL[phase], rasterized=many)
        failed = [x for x, y in zip(xs, curves.score, strict=True) if y is None]
        if failed:
            ax.scatter(failed, [0.0] * len(failed), marker="x", s=14, color="#dc2626",
                       linewidths=0.9, label="failed", clip_on=False)
        if curves.best_steps:
            bx = [xs[i] for i in curves.best_steps] + [xs[-1]]
            by = [curves.score[i] for i in curves.best_steps]
            ax.step(bx, by + [by[-1]], where="post", color=COLOR["best"], linewidth=2.2, label="best so far")
        if curves.boundary is not None:
            ax.axvspan(xs[curves.boundary], max(xs), color="#fff3e0", zorder=0, linewidth=0)
            ax.axvline(xs[curves.boundary], color=COLOR["boundary"], linestyle="--", linewidth=1.2,
                       label="pruning → merging")
        for split, marker in (("dev", "D"), ("test", "s")):
            if held[split]:
                ax.scatter([xs[r["at"]] for r in held[split]],
                           [r["score"] for r in held[split]], marker=marker, s=36, color=COLOR[split],
                           edgecolors="white", linewidths=0.8, zorder=5, label=split)
        for key, label in (("full", "full model (test)"), ("random", "random pruning (test, mean)")):
            if refs[key] is not None:
                ax.axhline(refs[key], color=COLOR[key], linestyle=":", linewidth=1.2)
                ax.annotate(f"{label} {refs[key]:.3f}", (1, refs[key]), xycoords=("axes fraction", "data"),
                            xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8,
                            color=COLOR[key])
        ax.set_xlabel(("search wall time (min)" if minutes else "search wall time (s)") if by_time
                      else "evaluation")
        ax.grid(color="#edf0f4", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_xlim(left=0)
    axes[0].set_ylabel("search score")
    axes[0].set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize=9)
    name = summary["config"].get("name") or view.name
    fig.suptitle(f"{name}: search score of every evaluation", fontsize=11, fontweight="bold")
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------- html
def _fmt(value: object, digits: int = 3) -> str:
    number = finite(value)
    return "—" if number is None else f"{number:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _table(headers: list[str], rows: list[list[str]], highlight: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=hl' if i == highlight else ''}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _final_table(summary: dict) -> str:
    final = summary.get("final")
    if not final:
        return "<p class=muted>No summary.json yet: the campaign has not finished its dev/test report.</p>"
    methods = final.get("rows") or method_rows(final)
    rows = [[m["label"], _fmt(m.get("test")), _fmt(m.get("dev")), _fmt(m.get("search")),
             str(m.get("evaluations", "—")), str(m.get("id", ""))] for m in methods]
    caption = (f"{final.get('task')}: keep {final.get('keep')} of {final.get('num_experts')} experts, "
               f"top-{final.get('top_k')}, test split")
    highlight = next((i for i, m in enumerate(methods) if m["chosen"]), None)
    return (f"<p class=muted>{html.escape(caption)}</p>"
            + _table(["method", "test", "dev", "search", "evaluations", "candidate"], rows, highlight))


def _heatmap_svg(matrix: list[list[float]], max_abs: float, cell: int) -> str:
    keep, experts = len(matrix), len(matrix[0]) if matrix else 0
    rects = []
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            t = min(1.0, abs(v) / max_abs) ** 0.75
            target = (180, 35, 24) if v < 0 else (29, 63, 154)
            rgb = tuple(round(w + (c - w) * t) for w, c in zip((248, 250, 252), target, strict=True))
            rects.append(f'<rect x="{j * cell}" y="{i * cell}" width="{cell}" height="{cell}" '
                         f'fill="rgb{rgb}"><title>kept {i} ← expert {j}: {v:.3f}</title></rect>')
    w, h = experts * cell, keep * cell
    return f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{"".join(rects)}</svg>'


def _expert_map(view: RunView, summary: dict) -> str:
    final = summary.get("final")
    chosen = (chosen_method(final) or {}).get("id") if final else None
    candidate_id = chosen or (summary.get("best") or {}).get("id")
    data = view.candidate(candidate_id) if candidate_id else None
    if not data:
        return "<p class=muted>No candidate file to show.</p>"
    experts = data["num_experts"]
    cell = max(3, min(16, 160 // experts))
    parts = []
    for name, key in (("merging M", "expert_merge"), ("router map R", "router_map")):
        mats = [layer[key] for layer in data["layers"]]
        max_abs = max((abs(v) for m in mats for row in m for v in row), default=1.0) or 1.0
        tiles = "".join(
            f'<div class=layer><div class=lname><b>L{i}</b> {html.escape(" · ".join(map(str, data["kept"][i])))}</div>'
            f"{_heatmap_svg(m, max_abs, cell)}</div>"
            for i, m in enumerate(mats)
        )
        parts.append(f"<h3>{name}</h3><div class=tiles>{tiles}</div>")
    label = "chosen on dev" if chosen else "best search candidate"
    kind = "pure pruning" if data["pure_pruning"] else "merged experts"
    return (f"<p class=muted>{html.escape(candidate_id)} ({label}, {kind}); rows: kept experts, "
            f"columns: original experts 0–{experts - 1}; blue = positive, red = negative weight.</p>"
            + "".join(parts))


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#18202d;
 background:#f4f6f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 10px}h3{font-size:13px;margin:12px 0 6px;color:#475467}
.card{background:#fff;border:1px solid #e3e7ee;border-radius:10px;padding:16px;margin:14px 0}
.muted,.facts{color:#667085;font-size:13px}.facts b{color:#18202d}
.kpis{display:grid;grid-template-columns:repeat(4,1fr);gap:12px}
.kpi{background:#fff;border:1px solid #e3e7ee;border-radius:10px;padding:10px 14px}
.kpi span{display:block;font-size:11px;text-transform:uppercase;letter-spacing:.06em;color:#667085}
.kpi b{font-size:22px}
img{width:100%;height:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:13px}
th{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#667085;text-align:right;
 border-bottom:1px solid #e3e7ee;padding:4px 8px}
td{text-align:right;padding:6px 8px;border-bottom:1px solid #f0f2f5}
th:first-child,td:first-child{text-align:left}tr.hl td{font-weight:650}
.tiles{display:flex;flex-wrap:wrap;gap:10px 14px}.layer svg{display:block;border:1px solid #e3e7ee}
.lname{font-size:11px;color:#667085}.lname b{color:#18202d}
pre{background:#f8fafc;border:1px solid #e3e7ee;border-radius:6px;padding:10px;overflow:auto;font-size:12px}
footer{color:#98a2b3;font-size:12px;text-align:center;padding:8px 0 20px}
"""


def render_html(view: RunView, figure_png: bytes) -> str:
    """The whole report page as one string (CSS inline, figure as a data URI)."""
    summary = view.summary()
    cfg, progress = summary["config"], summary["progress"]
    name = cfg.get("name") or view.name
    facts = " · ".join(
        f"{label} <b>{html.escape(str(value))}</b>"
        for label, value in (("model", cfg.get("model")), ("task", cfg.get("task")),
                             ("keep", cfg.get("keep")), ("strategy", cfg.get("strategy")),
                             ("router", cfg.get("router_mapping")), ("seed", cfg.get("seed")))
        if value is not None
    )
    best = summary.get("best") or {}
    budget = progress.get("budget")
    kpis = [
        ("best search score", _fmt(best.get("score"), 4)),
        ("search evaluations", f"{progress['done']:,}" + (f" / {budget:,}" if budget else "")),
        ("search time", _duration(progress.get("elapsed"))),
        ("failed", str(summary["counts"]["failed"])),
    ]
    kpi_html = "".join(f"<div class=kpi><span>{k}</span><b>{html.escape(v)}</b></div>" for k, v in kpis)
    workers = _table(
        ["worker", "evaluations", "failed", "eval/min", "s/eval", "utilisation"],
        [[w["worker"], f"{w['evaluations']:,}", str(w["failed"]), _fmt(w["per_min"], 1),
          _fmt(w["mean_seconds"], 1), "—" if w["utilisation"] is None else f"{w['utilisation']:.0%}"]
         for w in summary["workers"]],
    )
    boundary = summary.get("phase_boundary")
    phase_note = (f"Pruning ran for evaluations 1–{boundary}; merging from #{boundary + 1}."
                  if boundary is not None else "No merging phase in this run.")
    image = base64.b64encode(figure_png).decode()
    config_text = html.escape(view.config_text())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)} · eep report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><main>
<h1>{html.escape(name)}</h1><div class=facts>{facts} · status <b>{html.escape(summary["status"])}</b></div>
<div class=card><h2>Final result</h2>{_final_table(summary)}</div>
<div class=kpis>{kpi_html}</div>
<div class=card><h2>Search fitness</h2><p class=muted>{html.escape(phase_note)}</p>
<img alt="search score of every evaluation and the best so far" src="data:image/png;base64,{image}"></div>
<div class=card><h2>Expert map</h2>{_expert_map(view, summary)}</div>
<div class=card><h2>Workers</h2>{workers}</div>
<div class=card><h2>Campaign config</h2><details><summary>config.yaml</summary><pre>{config_text}</pre></details></div>
</main><footer>eep report · {html.escape(str(view.path))}</footer></body></html>
"""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportFiles:
    """Write report.html and fitness.png for `run_dir` into `out_dir` (default: the run directory)."""
    view = RunView(run_dir)
    if not view.config() and not (view.path / "evaluations.jsonl").is_file():
        raise FileNotFoundError(f"{view.path}: not a run directory (no config.yaml or evaluations.jsonl)")
    out = Path(out_dir) if out_dir is not None else view.path
    out.mkdir(parents=True, exist_ok=True)
    figure = render_figure(view, out / FIGURE_FILE)
    page = out / REPORT_FILE
    page.write_text(render_html(view, figure.read_bytes()), encoding="utf-8")
    return ReportFiles(html=page, figure=figure)
