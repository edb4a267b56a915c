"""summary.json: what the end of a campaign reports, and the method rows every reader shows.

`methods` maps a key to one row, in table order; each row carries its `label` and its `row` kind:
`reference` (the full model), `baseline` (random pruning, mean over the baselines) or `search`
(a strategy's finalists, chosen on dev). `chosen` is the key of the method whose candidate is the
campaign's result (exported, highlighted). The report, the dashboard and the text table all read
the rows through `method_rows`, which also derives labels for summaries written before labels
were stored (keys of that time: full, random, random_search, coordinate_descent,
eep_prune_only, eep).
"""

from __future__ import annotations

import math
from typing import Any

ROW_KINDS = ("reference", "baseline", "search")
FULL_KEY = "full"
RANDOM_KEY = "random"
FULL_LABEL = "full model"
RANDOM_LABEL = "random pruning (mean)"

# Summaries without labels (written before they were stored): labels, order and the chosen key.
_LEGACY_LABELS = {
    FULL_KEY: FULL_LABEL,
    RANDOM_KEY: RANDOM_LABEL,
    "random_search": "random search",
    "coordinate_descent": "coordinate descent",
    "eep_prune_only": "EEP prune-only",
    "eep": "EEP prune+merge",
}
_LEGACY_ROWS = {FULL_KEY: "reference", RANDOM_KEY: "baseline"}


def method_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The methods of a summary in table order, each with key, label, row kind and `chosen`."""
    methods: dict[str, dict] = summary.get("methods") or {}
    keys = list(methods)
    if not all("label" in m for m in methods.values()):
        order = list(_LEGACY_LABELS)
        keys = [k for k in order if k in methods] + [k for k in methods if k not in order]
    rows = []
    for key in keys:
        method = methods[key]
        rows.append({
            **method,
            "key": key,
            "label": method.get("label") or _LEGACY_LABELS.get(key) or key.replace("_", " "),
            "row": method.get("row") or _LEGACY_ROWS.get(key, "search"),
        })
    chosen = summary.get("chosen")
    if chosen is None:  # older summaries: the last strategy row was the exported choice
        searched = [r["key"] for r in rows if r["row"] == "search" and r.get("id")]
        chosen = searched[-1] if searched else None
    for row in rows:
        row["chosen"] = row["key"] == chosen
    return rows


def chosen_method(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The row of the campaign's chosen candidate, or None."""
    return next((r for r in method_rows(summary) if r["chosen"]), None)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary table (test split) as aligned text."""
    kept = summary.get("keep_budget") or f"keep {summary['keep']}"
    lines = [
        f"{summary['task']}: {kept} of {summary['num_experts']} experts, "
        f"top-{summary['top_k']}, test split",
    ]
    metric, searched = summary.get("metric"), summary.get("search_metric")
    # A fitness kind other than accuracy scores search only; dev keeps the task's search metric.
    dev = summary.get("dev_metric", searched)
    if metric and searched and (metric != searched or dev != searched):
        if dev == searched:
            lines.append(f"test in {metric}; dev and search in {searched}")
        else:
            lines.append(f"test in {metric}; dev in {dev}; search in {searched}")
    rows = method_rows(summary)
    width = max([24, *(len(r["label"]) + 1 for r in rows)])
    lines.append(f"{'method':<{width}} {'test':>7} {'dev':>7} {'search':>7} {'evals':>6}")
    for r in rows:
        cells = [fmt_score(r.get("test")), fmt_score(r.get("dev")), fmt_score(r.get("search"))]
        lines.append(
            f"{r['label']:<{width}} {cells[0]:>7} {cells[1]:>7} {cells[2]:>7} {r.get('evaluations', 0):>6}"
        )
    return "\n".join(lines)


def fmt_score(value: float | None) -> str:
    """A score with three decimals; "-" for none or NaN."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
