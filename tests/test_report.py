"""`eep report`: a self-contained report.html and fitness.png, written only where asked."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from fixtures.runs.synthetic import SyntheticRun

from eep.cli import main as eep_main
from eep.report import FIGURE_FILE, REPORT_FILE, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> SyntheticRun:
    run = SyntheticRun(tmp_path_factory.mktemp("runs") / "finished", total_iter=79)
    run.append(80)
    run.finish()
    return run


def listing(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


def test_report_is_self_contained_with_curves_table_and_expert_map(finished_run, tmp_path):
    before = listing(finished_run.path)
    files = write_report(finished_run.path, tmp_path / "out")
    assert listing(finished_run.path) == before  # --out: the run directory is not touched
    assert files.figure.read_bytes().startswith(PNG)
    page = files.html.read_text()
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == files.figure.read_bytes()
    assert "<style>" in page and "<link" not in page and "<script" not in page
    assert "http://" not in page and "https://" not in page
    assert "EEP prune+merge" in page and "full model" in page and "random pruning (mean)" in page
    assert f"{finished_run.best:.3f}" in page
    assert page.count("<svg") == 8  # merging M and router map R for each of the 4 layers
    assert "merging from #41" in page


def test_report_of_a_running_campaign_says_the_table_is_not_there_yet(tmp_path):
    run = SyntheticRun(tmp_path / "running", total_iter=99)
    run.append(12)
    files = write_report(run.path)
    assert files.html.parent == run.path and files.figure.parent == run.path
    assert "No summary.json yet" in files.html.read_text()
    assert "No merging phase" in files.html.read_text()


def test_cli_writes_into_the_run_directory(finished_run, tmp_path, capsys):
    run = SyntheticRun(tmp_path / "copy", total_iter=19)
    run.append(20)
    before = set(listing(run.path))
    assert eep_main(["report", str(run.path)]) == 0
    assert set(listing(run.path)) - before == {Path(REPORT_FILE), Path(FIGURE_FILE)}
    assert "report.html" in capsys.readouterr().out


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path):
    assert eep_main(["report", str(tmp_path)]) == 2


def _table_rows(page: str) -> list[tuple[bool, str]]:
    """(highlighted, label) of each row of the final-result table, in order."""
    table = page.split("<h2>Final result</h2>", 1)[1].split("</table>", 1)[0]
    return [(hl == " class=hl", label) for hl, label in re.findall(r"<tr( class=hl)?><td>([^<]*)</td>", table)]


def test_report_reads_method_labels_and_the_chosen_row_from_summary(tmp_path):
    run = SyntheticRun(tmp_path / "plugin", total_iter=19)
    run.append(20)
    summary = run.finish()
    # A strategy the report has never heard of: its label and the chosen key come from the file.
    eep_row = summary["methods"].pop("eep")
    summary["methods"]["toy_first"] = {**eep_row, "label": "toy first list"}
    summary["methods"]["toy"] = {**eep_row, "label": "toy search (final)"}
    summary["methods"]["toy"]["id"] = "some-other-candidate"
    summary["chosen"] = "toy_first"  # not the last row: the file says which one
    (run.path / "summary.json").write_text(json.dumps(summary))
    page = write_report(run.path, tmp_path / "out").html.read_text()
    assert _table_rows(page) == [(False, "full model"), (False, "random pruning (mean)"),
                                 (True, "toy first list"), (False, "toy search (final)")]
    assert "EEP prune+merge" not in page
    assert f"{run.best_id} (chosen on dev" in page


def test_report_of_a_summary_without_labels_derives_them_from_the_keys(tmp_path):
    run = SyntheticRun(tmp_path / "old", total_iter=19)
    run.append(20)
    run.finish(legacy=True)
    page = write_report(run.path, tmp_path / "out").html.read_text()
    assert _table_rows(page) == [(False, "full model"), (False, "random pruning (mean)"),
                                 (True, "EEP prune+merge")]
    assert f"{run.best_id} (chosen on dev" in page


# --------------------------------------------------------------------------------- a real campaign
def _table_cells(page: str) -> list[list[str]]:
    """The cells of each row of the final-result table, in order."""
    table = page.split("<h2>Final result</h2>", 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    return [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def test_report_of_a_real_campaign(real_run, tmp_path):
    """The report over a run directory `eep.campaign` wrote (the `real_run` fixture)."""
    run_dir = real_run.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    search = [r for r in records if r["split"] == "search"]
    files = write_report(run_dir, tmp_path / "out")
    assert files.figure.read_bytes().startswith(PNG)
    page = files.html.read_text()

    def fmt(value):
        return "—" if value is None else f"{value:.3f}"

    methods = summary["methods"]
    assert _table_rows(page) == [(key == summary["chosen"], m["label"]) for key, m in methods.items()]
    assert _table_cells(page) == [
        [m["label"], fmt(m.get("test")), fmt(m.get("dev")), fmt(m.get("search")),
         str(m.get("evaluations", "—")), str(m.get("id", ""))]
        for m in methods.values()
    ]
    assert f"{max(r['score'] for r in search):.4f}" in page
    boundary = [r["phase"] for r in search].index("merge")
    assert f"merging from #{boundary + 1}." in page

    chosen_id = methods[summary["chosen"]]["id"]
    assert f"{chosen_id} (chosen on dev" in page
    # the expert map draws the chosen candidate's own matrices: M then R, one tile per layer
    from eep.candidate import Candidate

    saved = Candidate.load(run_dir / "candidates" / f"{chosen_id}.safetensors")
    svgs = re.findall(r"<svg .*?</svg>", page)
    assert len(svgs) == 2 * saved.num_layers
    for svg, matrix in zip(svgs, [*saved.expert_merge, *saved.router_map], strict=True):
        titles = re.findall(r"<title>kept (\d+) ← expert (\d+): (-?[0-9.]+)</title>", svg)
        assert [(int(i), int(j), float(v)) for i, j, v in titles] == [
            (i, j, round(float(matrix[i, j]), 3)) for i in range(matrix.shape[0]) for j in range(8)
        ]
