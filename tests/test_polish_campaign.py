"""A campaign that polishes its dev winner: the summary row, the keep rule, export and resume."""

from __future__ import annotations

import json
import time

import pytest

from eep.candidate import Candidate
from eep.models.testing import save_tiny_model


def _config(model: str, run_dir, **extra):
    from eep.config import config_from_dict

    return config_from_dict({
        "name": "polished",
        "model": model,
        "task": {"name": "compare", "source": {"kind": "builtin", "name": "compare"},
                 "splits": {"search": 8, "dev": 8, "test": 8}},
        "keep": 2,
        "strategy": {"kind": "eep", "init_population": 4, "discrete_iter": 8, "total_iter": 12},
        "final": {"random_baselines": 1, "dev_top": 2},
        "workers": 0,
        "evaluation": {"device": "cpu", "threads": 1},
        "output": {"run_dir": str(run_dir), "export": True},
        **extra,
    })


@pytest.fixture(scope="module")
def polished_run(tmp_path_factory):
    from eep.campaign import run_campaign

    root = tmp_path_factory.mktemp("polish")
    model = save_tiny_model(root / "model", "mixtral", num_layers=3)
    config = _config(model, root / "run", polish={"steps": 25, "lr": 0.03})
    return config, run_campaign(config, quiet=True)


def test_the_polished_candidate_is_reported_and_kept_only_when_it_beats_dev(polished_run):
    config, result = polished_run
    summary = result.summary
    row = summary["methods"]["polish"]
    assert row["label"] == "EEP prune+merge + polish"
    assert row["kl_after"] < row["kl_before"]
    assert row["steps"] == 25 and row["seconds"] > 0 and summary["polish_seconds"] == row["seconds"]
    winner = summary["methods"]["eep"]
    polished = Candidate.load(result.run_dir / "candidates" / f"{row['id']}.safetensors")
    assert polished.phase == "polish" and polished.extra["polish"]["steps"] == 25
    assert polished.parents == (winner["id"],)
    # (dev, then KL): the polished one needs a better dev score, or the same with a lower KL.
    kept = row["dev"] > winner["dev"] or (row["dev"] == winner["dev"] and row["kl_after"] < row["kl_before"])
    assert summary["chosen"] == ("polish" if kept else "eep")
    assert ("note" in row) == (not kept)
    chosen = polished if kept else Candidate.load(result.run_dir / "candidates" / f"{winner['id']}.safetensors")
    assert result.best.content_hash() == chosen.content_hash()
    # The export is the chosen candidate.
    exported = Candidate.load(result.run_dir / "model" / "eep_candidate.safetensors")
    assert exported.content_hash() == chosen.content_hash()
    done = json.loads((result.run_dir / "polish.json").read_text())
    assert done["id"] == row["id"] and done["kl_after"] == row["kl_after"]


def test_a_resumed_finished_campaign_reads_its_polish_back(polished_run, monkeypatch):
    """polish.json + the saved candidate: the end of a resumed campaign does not polish again."""
    from eep.campaign import Campaign

    config, result = polished_run
    before = (result.run_dir / "polish.json").read_text()

    def no_polish(*args, **kwargs):
        raise AssertionError("polished again on resume")

    monkeypatch.setattr("eep.distributed.pool.polish_job", no_polish)
    again = Campaign(config, resume=True, quiet=True).run()
    assert (result.run_dir / "polish.json").read_text() == before
    assert again.summary["methods"]["polish"] == result.summary["methods"]["polish"]
    assert again.summary["chosen"] == result.summary["chosen"]


def test_a_failed_polish_keeps_the_winner_and_says_why(tmp_path, monkeypatch):
    from eep.campaign import run_campaign
    from eep.result import FitnessResult

    model = save_tiny_model(tmp_path / "model", "mixtral", num_layers=2)

    def slow_failure(evaluators, job):
        time.sleep(1.0)
        return FitnessResult.failure("RuntimeError: out of memory", split="search"), None

    monkeypatch.setattr("eep.distributed.pool.polish_job", slow_failure)
    result = run_campaign(_config(model, tmp_path / "run", polish=True), quiet=True)
    assert result.summary["chosen"] == "eep"
    assert result.summary["methods"]["polish"]["note"] == "polishing failed: RuntimeError: out of memory"
    # The search clock stops with the search: neither the end phase nor polishing counts.
    records = [json.loads(line) for line in (result.run_dir / "evaluations.jsonl").read_text().splitlines()]
    last = max(r["elapsed"] for r in records if r["split"] == "search")
    assert last <= result.summary["search_seconds"] < last + 0.5
