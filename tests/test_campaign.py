"""The campaign driver over a fake pool: steady state, resume, final report (no model calls)."""

from __future__ import annotations

import json

import pytest
import torch

from eep.campaign import Campaign, run_campaign
from eep.config import config_from_dict
from eep.distributed.pool import Job
from eep.models.testing import tiny_model
from eep.result import FitnessResult
from eep.runlog import RunDirError, RunLog

TARGET = [0, 1, 2, 3]


def synthetic_score(job: Job) -> float:
    """Overlap of each layer's dominant experts with a target set, plus a merge term."""
    if job.candidate is None:
        return 1.0
    score = 0.0
    for merge in job.candidate.expert_merge:
        dominant = merge.abs().argmax(dim=1).tolist()
        score += len(set(dominant) & set(TARGET)) / len(TARGET)
        score -= 0.01 * float((merge - torch.eye(8)[dominant]).abs().sum())
    offset = {"search": 0.0, "dev": 0.001, "test": 0.002}[job.split]
    return score / len(job.candidate.expert_merge) + offset


class FakePool:
    """`workers` slots; completes jobs in a seeded scrambled order; can die after N results."""

    def __init__(self, workers: int = 1, die_after: int | None = None, seed: int = 0, score=synthetic_score):
        self.workers, self.die_after, self.score = workers, die_after, score
        self.queue: list[Job] = []
        self.returned = 0
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def size(self):
        return self.workers

    @property
    def in_flight(self):
        return len(self.queue)

    def idle(self):
        return max(0, self.workers - len(self.queue))

    def submit(self, job):
        self.queue.append(job)

    def wait(self, timeout=None):
        if self.die_after is not None and self.returned >= self.die_after:
            raise KeyboardInterrupt("simulated kill")
        i = int(torch.randint(len(self.queue), (1,), generator=self.gen)) if self.workers > 1 else 0
        job = self.queue.pop(i)
        job.result = FitnessResult(score=self.score(job), metric="acc", count=10, split=job.split)
        job.worker = f"w{i}"
        self.returned += 1
        return [job]

    def close(self):
        pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("mixtral").save_pretrained(path)
    return str(path)


def make_config(model_dir, run_dir, **extra):
    data = {
        "name": "t",
        "model": model_dir,
        "task": "add",
        "keep": 4,
        "strategy": {"kind": "eep", "init_population": 6, "discrete_iter": 15, "total_iter": 30},
        "final": {"random_baselines": 3, "dev_top": 4},
        "output": {"run_dir": str(run_dir), "export": False, "checkpoint_every": 7},
    }
    data.update(extra)
    return config_from_dict(data)


def search_trace(run_dir):
    return [(r["id"], r["hash"], r["score"]) for r in RunLog.open(run_dir).records if r["split"] == "search"]


@pytest.mark.parametrize("workers", [1, 3])
def test_campaign_runs_to_a_summary(tmp_path, model_dir, workers):
    cfg = make_config(model_dir, tmp_path / "run")
    result = run_campaign(cfg, quiet=True, pool=FakePool(workers))
    methods = result.summary["methods"]
    assert list(methods) == ["full", "random", "eep_prune_only", "eep"]
    assert [m["label"] for m in methods.values()] == [
        "full model", "random pruning (mean)", "EEP prune-only", "EEP prune+merge"]
    assert [m["row"] for m in methods.values()] == ["reference", "baseline", "search", "search"]
    assert result.summary["chosen"] == "eep"
    assert methods["full"]["test"] == 1.0
    assert methods["eep"]["evaluations"] == 31  # total_iter + 1, as the authors ran
    assert methods["eep"]["dev"] >= methods["eep_prune_only"]["dev"]  # the pruning winner competes
    records = RunLog.open(tmp_path / "run").records
    search = [r for r in records if r["split"] == "search"]
    assert len({r["hash"] for r in search}) == len(search) == 31  # no candidate scored twice
    assert len({r["id"] for r in search}) == 31
    dev = [r for r in records if r["split"] == "dev"]
    assert 1 <= len(dev) <= 8
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["methods"]["eep"]["id"] == methods["eep"]["id"]
    assert (tmp_path / "run" / "best.safetensors").is_file()
    assert "EEP prune+merge" in result.table


# The KeyboardInterrupt runs the search loop's exit checkpoint, so these resumes replay nothing;
# tests/test_resume.py resumes from the stale checkpoint a real crash leaves.
@pytest.mark.parametrize("kill_points", [[1], [9, 20], [14, 15, 29]])
def test_killed_and_resumed_campaign_makes_the_same_decisions(tmp_path, model_dir, kill_points):
    reference = make_config(model_dir, tmp_path / "ref")
    run_campaign(reference, quiet=True, pool=FakePool(1))
    want = search_trace(tmp_path / "ref")

    cfg = make_config(model_dir, tmp_path / "run")
    done = 0
    for i, point in enumerate(kill_points):
        with pytest.raises(KeyboardInterrupt):
            Campaign(cfg, resume=i > 0, quiet=True, pool=FakePool(1, die_after=point - done)).run()
        done = len(search_trace(tmp_path / "run"))
        assert done == point
    run_campaign(cfg, resume=True, quiet=True, pool=FakePool(1))
    assert search_trace(tmp_path / "run") == want


def test_torn_last_line_is_dropped_and_resume_continues(tmp_path, model_dir):
    cfg = make_config(model_dir, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        Campaign(cfg, quiet=True, pool=FakePool(1, die_after=5)).run()
    path = tmp_path / "run" / "evaluations.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "eep-00006", "split": "sea')  # killed mid-write
    run_campaign(cfg, resume=True, quiet=True, pool=FakePool(1))
    assert len(search_trace(tmp_path / "run")) == 31


def test_existing_run_dir_is_not_overwritten(tmp_path, model_dir):
    cfg = make_config(model_dir, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        Campaign(cfg, quiet=True, pool=FakePool(1, die_after=2)).run()
    with pytest.raises(RunDirError, match="--resume"):
        Campaign(cfg, quiet=True, pool=FakePool(1))


def test_budget_caps_evaluations(tmp_path, model_dir):
    cfg = make_config(model_dir, tmp_path / "run", budget={"max_evaluations": 12})
    result = run_campaign(cfg, quiet=True, pool=FakePool(2))
    assert result.summary["search_evaluations"] == 12


def test_summary_names_the_search_metric_when_it_differs(tmp_path, model_dir):
    plain = run_campaign(make_config(model_dir, tmp_path / "a", budget={"max_evaluations": 8}),
                         quiet=True, pool=FakePool(1))
    assert plain.summary["metric"] == plain.summary["search_metric"] == "exact_match"
    assert "dev and search in" not in plain.table
    task = {"name": "add", "source": {"kind": "builtin", "name": "add"}, "search_metric": "char_similarity"}
    dense = run_campaign(make_config(model_dir, tmp_path / "b", task=task, budget={"max_evaluations": 8}),
                         quiet=True, pool=FakePool(1))
    assert dense.summary["search_metric"] == "char_similarity"
    assert "test in exact_match; dev and search in char_similarity" in dense.table
    forced = run_campaign(make_config(model_dir, tmp_path / "c", fitness="likelihood", budget={"max_evaluations": 8}),
                          quiet=True, pool=FakePool(1))
    assert (forced.summary["search_metric"], forced.summary["dev_metric"]) == ("loglik", "exact_match")
    assert "test in exact_match; dev in exact_match; search in loglik" in forced.table


@pytest.mark.parametrize("kind", ["random", "coordinate_descent"])
def test_baseline_strategies_run(tmp_path, model_dir, kind):
    strategy = {"kind": kind, "budget": 40}
    if kind == "coordinate_descent":
        strategy["max_subsets_per_layer"] = 10
    cfg = make_config(model_dir, tmp_path / "run", strategy=strategy)
    result = run_campaign(cfg, quiet=True, pool=FakePool(2))
    name = "random_search" if kind == "random" else kind
    method = result.summary["methods"][name]
    assert method["evaluations"] <= 40 and method["test"] > 0


def test_no_complete_candidate_is_reported(tmp_path, model_dir):
    strategy = {"kind": "coordinate_descent", "budget": 5}
    cfg = make_config(model_dir, tmp_path / "run", strategy=strategy)
    result = run_campaign(cfg, quiet=True, pool=FakePool(1))
    assert "no complete candidate" in result.summary["methods"]["coordinate_descent"]["note"]


def dev_records(run_dir):
    return [r for r in RunLog.open(run_dir).records if r["split"] == "dev"]


@pytest.mark.parametrize("dev_top", [1, 3])
def test_final_dev_top_is_honoured_for_eep(tmp_path, model_dir, dev_top):
    cfg = make_config(model_dir, tmp_path / "run", final={"random_baselines": 0, "dev_top": dev_top})
    result = run_campaign(cfg, quiet=True, pool=FakePool(1))
    search = sorted((r for r in RunLog.open(tmp_path / "run").records if r["split"] == "search"),
                    key=lambda r: -r["score"])
    pruning = [r for r in search if r["phase"] in ("init", "prune")]
    # Dev scores exactly the top dev_top of each EEP list (one candidate may be in both).
    want = {r["hash"] for r in pruning[:dev_top]} | {r["hash"] for r in search[:dev_top]}
    assert sorted(r["hash"] for r in dev_records(tmp_path / "run")) == sorted(want)
    assert result.summary["methods"]["eep"]["dev"] is not None


def pure_pruning_wins(job: Job) -> float:
    """1 for the full model and every pure pruning, 0 for merged candidates: both EEP lists tie."""
    if job.candidate is None:
        return 1.0
    return float(all(bool(((m == 0) | (m == 1)).all()) for m in job.candidate.expert_merge))


def test_a_candidate_both_eep_lists_choose_is_scored_once_on_test(tmp_path, model_dir):
    cfg = make_config(model_dir, tmp_path / "run")
    result = run_campaign(cfg, quiet=True, pool=FakePool(1, score=pure_pruning_wins))
    methods = result.summary["methods"]
    assert methods["eep"]["id"] == methods["eep_prune_only"]["id"]
    records = RunLog.open(tmp_path / "run").records
    for split in ("dev", "test"):
        hashes = [r["hash"] for r in records if r["split"] == split]
        assert len(hashes) == len(set(hashes)), split
    test = [r for r in records if r["split"] == "test"]
    assert len(test) == 1 + 1 + 3  # full model, the one chosen candidate, 3 baselines
    assert methods["eep"]["test"] == methods["eep_prune_only"]["test"]


def test_a_resumed_end_phase_reuses_dev_and_test_records(tmp_path, model_dir):
    cfg = make_config(model_dir, tmp_path / "run")
    first = run_campaign(cfg, quiet=True, pool=FakePool(1))
    before = len(RunLog.open(tmp_path / "run").records)
    (tmp_path / "run" / "summary.json").unlink()
    again = Campaign(cfg, resume=True, quiet=True, pool=FakePool(1)).finish()
    assert len(RunLog.open(tmp_path / "run").records) == before
    assert again.summary["methods"] == first.summary["methods"]
