"""`eep report`: a self-contained report.html and fitness.png, written only where asked."""

from __future__ import annotations

import base64
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
