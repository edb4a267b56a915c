"""RayPool on a real local Ray: steady state, faults (killed actors), elasticity, campaigns.

One Ray cluster for the whole module (start-up costs seconds): a head with 2 CPUs, to which the
elasticity test adds and removes a 1-CPU node. Most tests use a fake evaluator (a sleep and a
score from the candidate's hash) so that they measure the pool, not the model; one campaign runs
the real Evaluator on a tiny random Mixtral with the character tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")

from eep.builtin.tokenizer import build_tokenizer  # noqa: E402
from eep.campaign import Campaign, run_campaign  # noqa: E402
from eep.candidate import Candidate  # noqa: E402
from eep.config import config_from_dict  # noqa: E402
from eep.distributed import ray_runtime  # noqa: E402
from eep.distributed.pool import Job, PoolError, WorkerSpec  # noqa: E402
from eep.distributed.ray_pool import RayPool, actor_demand, actor_spec, actors_that_fit  # noqa: E402
from eep.models.testing import tiny_model  # noqa: E402
from eep.result import FitnessResult  # noqa: E402
from eep.runlog import RunLog  # noqa: E402

# Fake evaluators travel to the actors by value: the workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPLITS = ("search", "dev", "test")


class FakeEvaluator:
    """Sleeps `seconds` (`slow_for[id]` for those ids), scores by hash; raises for candidates
    whose id is in `raise_for`, and kills its own process for ids in `exit_for` (a worker lost
    mid-evaluation)."""

    def __init__(self, split: str, seconds: float, raise_for=(), exit_for=(), slow_for=None):
        self.split, self.seconds = split, seconds
        self.raise_for, self.exit_for = set(raise_for), set(exit_for)
        self.slow_for = dict(slow_for or {})

    def evaluate(self, candidate):
        cid = "full" if candidate is None else candidate.id
        if cid in self.exit_for:
            os._exit(1)
        if cid in self.raise_for:
            raise ValueError(f"cannot score {cid}")
        time.sleep(self.slow_for.get(cid, self.seconds))
        key = "full" if candidate is None else candidate.content_hash()
        score = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
        return FitnessResult(score=score, metric="acc", count=10, seconds=self.seconds, split=self.split)


def fake_build(seconds: float = 0.05, raise_for=(), exit_for=(), fail: str | None = None,
               slow_for=None):
    """A `build` for RayPool: fake evaluators instead of a model."""

    def build(spec: WorkerSpec) -> dict:
        if fail:
            raise FileNotFoundError(fail)
        return {s: FakeEvaluator(s, seconds, raise_for, exit_for, slow_for) for s in spec.splits}

    return build


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster on loopback: a 2-CPU head, nodes added by tests."""
    ray_runtime.use_loopback()
    # Every Ray process (and the driver) reports metrics this often; the default is 10 s.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "500")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Mixtral with the built-in character tokenizer."""
    path = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_model("mixtral", num_layers=2).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def make_config(model_dir, run_dir, workers=2, **extra):
    data = {
        "name": "ray-test",
        "model": model_dir,
        "task": {"name": "add", "source": {"kind": "builtin", "name": "add"},
                 "splits": {"search": 10, "dev": 10, "test": 10}},
        "keep": 4,
        "strategy": {"kind": "eep", "init_population": 6, "discrete_iter": 12, "total_iter": 24},
        "final": {"random_baselines": 2, "dev_top": 3},
        "workers": workers,
        "resources": {"num_cpus": 1},
        "evaluation": {"device": "cpu", "threads": 1},
        "output": {"run_dir": str(run_dir), "export": False, "checkpoint_every": 5},
    }
    data.update(extra)
    return config_from_dict(data)


def spec_of(config) -> WorkerSpec:
    return WorkerSpec(model=config.model, task=config.task.model_dump(mode="json"), splits=SPLITS)


def candidate(i: int, generator=None) -> Candidate:
    import torch

    generator = generator or torch.Generator().manual_seed(i)
    return Candidate.random_pruning(2, 8, 4, generator, id=f"c{i:03d}")


def drain(pool: RayPool) -> list[Job]:
    done = []
    while pool.in_flight:
        done += pool.wait(timeout=60)
    return done


def grow_until(pool: RayPool, workers: int, seconds: float = 120) -> None:
    """Let the pool start actors (and wait for them to load) until `workers` are idle."""
    deadline = time.monotonic() + seconds
    while pool.size < workers or pool.idle() < workers:
        pool.wait(timeout=0.3)
        assert time.monotonic() < deadline, f"pool has {pool.size} actors, {pool.idle()} ready"


def search_records(run_dir) -> list[dict]:
    return [r for r in RunLog.open(run_dir).records if r["split"] == "search"]


def scrape_eep_metrics(campaign: str) -> dict[tuple[str, str], float]:
    """The head node's Prometheus export, eep samples of one campaign: (sample, split) -> value.

    Histogram buckets come as (`..._bucket le=X`, split). Ray approximates a histogram's `_sum`
    from bucket midpoints, so it is left out.
    """
    parser = pytest.importorskip("prometheus_client.parser")
    head = next(n for n in ray.nodes() if n["Alive"] and n["MetricsExportPort"])
    url = f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_eep_") and sample.labels.get("campaign") == campaign:
                if sample.name.endswith("_sum"):
                    continue
                name = sample.name
                if name.endswith("_bucket"):
                    name += f" le={float(sample.labels['le'])}"
                key = (name, sample.labels.get("split", ""))
                out[key] = out.get(key, 0.0) + sample.value
    return out


# ---------------------------------------------------------------------------------- pure logic
@pytest.mark.parametrize(
    ("available", "demand", "wanted", "reserved", "expected"),
    [
        ({"CPU": 2.0}, {"CPU": 1.0}, 4, 0, 2),
        ({"CPU": 2.0}, {"CPU": 1.0}, 1, 0, 1),
        ({"CPU": 2.0}, {"CPU": 1.0}, 4, 1, 1),
        ({"CPU": 16.0, "GPU": 8.0}, {"CPU": 2.0, "GPU": 2.0}, 8, 0, 4),  # GPUs bind
        ({"CPU": 16.0, "GPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}, 8, 0, 4),  # CPUs bind
        ({"CPU": 16.0}, {"CPU": 1.0, "GPU": 1.0}, 2, 0, 0),  # no GPU in the cluster
        ({"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}, 4, 0, 2),  # two replicas per GPU
        ({"CPU": 8.0, "memory": 100 * 2**30}, actor_demand(1, 0, 40), 8, 0, 2),
        ({"CPU": 0.9999999999}, {"CPU": 1.0}, 1, 0, 1),  # float noise in Ray's view
        ({"CPU": 2.0}, {"CPU": 1.0}, 0, 0, 0),
    ],
)
def test_actors_that_fit(available, demand, wanted, reserved, expected):
    assert actors_that_fit(available, demand, wanted, reserved) == expected


def test_actor_demand_names_ray_resources():
    assert actor_demand(1, 0, None) == {"CPU": 1.0}
    assert actor_demand(8, 2, 64) == {"CPU": 8.0, "GPU": 2.0, "memory": 64 * 2**30}


def test_actor_spec_spreads_a_multi_gpu_replica_and_sets_threads():
    spec = WorkerSpec(model="m", task={})
    assert actor_spec(spec, 1, 8).device_map is None
    assert actor_spec(spec, 2, 16).device_map == "auto"
    assert actor_spec(spec, 0, 2).threads == 2
    assert actor_spec(WorkerSpec(model="m", task={}, threads=1), 0, 2).threads == 1  # as asked
    assert actor_spec(spec, 0, 0.5).threads is None


def test_build_evaluators_passes_device_map(monkeypatch):
    import eep.models.loading

    seen = {}

    def fake_load_model(spec, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(eep.models.loading, "load_model", fake_load_model)
    from eep.distributed.pool import build_evaluators

    with pytest.raises(RuntimeError, match="stop here"):
        build_evaluators(WorkerSpec(model="m", task={}, device="cpu", device_map="auto"))
    assert seen["device_map"] == "auto"


def test_cluster_address(monkeypatch):
    for key in ("RAY_ADDRESS", ray_runtime.JOB_ENV):
        monkeypatch.delenv(key, raising=False)
    assert ray_runtime.cluster_address() is None  # a local Ray
    assert ray_runtime.cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert ray_runtime.cluster_address() == "10.0.0.2:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what `ray job submit` reads
    assert ray_runtime.cluster_address() == "auto"
    monkeypatch.setenv(ray_runtime.JOB_ENV, "{}")
    assert ray_runtime.cluster_address() == "auto"  # inside a submitted job


def test_loopback_env(monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    ray_runtime.use_loopback()
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER is False


# ---------------------------------------------------------------------------------- the pool
@pytest.mark.slow
def test_steady_state_and_python_errors(cluster, model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run")
    pool = RayPool(spec_of(cfg), cfg, build=fake_build(seconds=0.2, raise_for={"c001"}),
                   poll_seconds=0.1)
    try:
        grow_until(pool, 2)  # the second actor may still be loading
        assert pool.size == 2 and pool.in_flight == 0
        jobs = [Job(candidate(i)) for i in range(6)]
        for job in jobs:
            pool.submit(job)
        assert pool.in_flight == 6 and pool.idle() == 0
        done = drain(pool)
        assert sorted(j.candidate.id for j in done) == [j.candidate.id for j in jobs]
        assert {j.worker for j in done} == {"ray-0", "ray-1"}  # both actors worked
        by_id = {j.candidate.id: j.result for j in done}
        # a Python error is a failed result; the actor lives on
        assert by_id["c001"].failed and "ValueError: cannot score c001" in by_id["c001"].error
        assert not any(r.failed for cid, r in by_id.items() if cid != "c001")
        assert pool.actors.keys() == {"ray-0", "ray-1"}
    finally:
        pool.close()


@pytest.mark.slow
def test_constructor_error_is_reported_not_retried(cluster, model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run", workers=1)
    with pytest.raises(PoolError, match="could not start|no such model"):
        RayPool(spec_of(cfg), cfg, build=fake_build(fail="no such model"), poll_seconds=0.1)


@pytest.mark.slow
def test_a_candidate_that_kills_every_worker_is_recorded_failed(cluster, model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run", workers=1)
    pool = RayPool(spec_of(cfg), cfg, build=fake_build(exit_for={"c001"}), poll_seconds=0.1,
                   max_restarts=5, max_attempts=2)
    try:
        for i in range(3):
            pool.submit(Job(candidate(i)))
        finished = drain(pool)
        done = {j.candidate.id: j for j in finished}
        assert sorted(j.candidate.id for j in finished) == ["c000", "c001", "c002"]  # once each
        assert "WorkerLost" in done["c001"].result.error and done["c001"].worker == "lost"
        assert not done["c002"].result.failed and done["c002"].worker == "ray-2"
        assert pool.deaths == 2  # c001 killed ray-0, then its replacement ray-1
        assert pool.size == 1 and set(pool.actors) == {"ray-2"}  # replaced twice
    finally:
        pool.close()


class KillingPool(RayPool):
    """Kills the actor that takes the N-th submitted job, for each N in `kill_at` (in flight)."""

    def __init__(self, *args, kill_at=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at, self.submitted, self.killed = set(kill_at), 0, []
        self.killed_jobs: list[str] = []  # candidate ids in flight on the killed actors

    def submit(self, job):
        super().submit(job)
        self.submitted += 1
        if self.submitted in self.kill_at:
            for name, running in self.running.items():
                if running is job:
                    ray.kill(self.actors[name])
                    self.killed.append(name)
                    self.killed_jobs.append(job.candidate.id)


@pytest.mark.slow
def test_campaign_survives_killed_actors(cluster, model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run")
    pool = KillingPool(spec_of(cfg), cfg, build=fake_build(seconds=0.05), poll_seconds=0.1,
                       kill_at=(3, 12))
    campaign = Campaign(cfg, quiet=True, pool=pool)
    result = campaign.run()
    assert len(pool.killed) == len(pool.killed_jobs) == 2
    assert pool.deaths == 2
    search = search_records(tmp_path / "run")
    # every asked candidate has exactly one search result
    assert len(search) == campaign.progress.asked == result.summary["search_evaluations"] == 25
    assert len({r["id"] for r in search}) == len({r["hash"] for r in search}) == 25
    assert not any(r["error"] for r in search)
    # the killed actors' candidates went back in the queue and another actor scored them
    for name, cid in zip(pool.killed, pool.killed_jobs, strict=True):
        (record,) = [r for r in search if r["id"] == cid]
        assert record["worker"] != name and record["score"] is not None
    workers = {r["worker"] for r in RunLog.open(tmp_path / "run").records}
    assert workers - {"ray-0", "ray-1"}  # replacements worked too
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["search_evaluations"] == 25


@pytest.mark.slow
def test_all_workers_gone_stops_cleanly_and_resumes(cluster, model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run", max_worker_restarts=0)  # the YAML field
    pool = KillingPool(spec_of(cfg), cfg, build=fake_build(seconds=0.05), poll_seconds=0.1,
                       kill_at=(5, 8))
    assert pool.max_restarts == 0
    with pytest.raises(PoolError, match="every Ray worker is gone"):
        Campaign(cfg, quiet=True, pool=pool).run()
    assert pool.deaths == 2 and sorted(pool.killed) == ["ray-0", "ray-1"]  # none replaced
    first = search_records(tmp_path / "run")
    assert 4 <= len(first) < 25
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "run" / "summary.json").exists()

    pool = RayPool(spec_of(cfg), cfg, build=fake_build(seconds=0.02), poll_seconds=0.1)
    result = run_campaign(cfg, resume=True, quiet=True, pool=pool)
    search = search_records(tmp_path / "run")
    assert len(search) == len({r["id"] for r in search}) == 25
    assert result.summary["search_evaluations"] == 25


@pytest.mark.slow
def test_pool_grows_with_the_cluster_and_survives_a_lost_node(cluster, model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run", workers=3)
    # The first three jobs after the third actor joins take long: one is surely on that actor
    # when its node goes away.
    slow = {f"c{i:03d}": 3.0 for i in range(4, 7)}
    pool = RayPool(spec_of(cfg), cfg, build=fake_build(seconds=0.1, slow_for=slow),
                   poll_seconds=0.2)
    node = None
    try:
        grow_until(pool, 2)  # the head has 2 CPUs: 2 of 3 workers fit
        for i in range(4):
            pool.submit(Job(candidate(i)))
        drain(pool)
        time.sleep(1.0)
        assert pool.size == 2  # the third waits for room
        node = cluster.add_node(num_cpus=1)
        grow_until(pool, 3)
        for i in range(4, 40):
            pool.submit(Job(candidate(i)))
        lost = pool.running["ray-2"]
        assert lost.candidate.id in slow and pool.deaths == 0
        cluster.remove_node(node, allow_graceful=False)  # the third actor's node goes away
        node = None
        done = drain(pool)
        # each job exactly once; the lost node's job was re-queued and scored on the head
        assert sorted(j.candidate.id for j in done) == [f"c{i:03d}" for i in range(4, 40)]
        (again,) = [j for j in done if j.candidate.id == lost.candidate.id]
        assert again.worker in {"ray-0", "ray-1"} and not again.result.failed
        assert {j.worker for j in done} == {"ray-0", "ray-1"}  # ray-2 finished nothing
        assert pool.deaths == 1
        assert pool.size == 2  # goes on with the head's two
    finally:
        if node is not None:
            cluster.remove_node(node)
        pool.close()


@pytest.mark.slow
def test_campaign_with_the_real_evaluator(cluster, model_dir, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run", budget={"max_evaluations": 6},
                      final={"random_baselines": 1, "dev_top": 2})
    result = run_campaign(cfg, quiet=True)  # make_pool -> RayPool (workers: 2)
    records = RunLog.open(tmp_path / "run").records
    search = [r for r in records if r["split"] == "search"]
    assert len(search) == 6 and not any(r["error"] for r in search)
    assert {r["worker"] for r in records} <= {"ray-0", "ray-1"}
    assert {r["split"] for r in records} == {"search", "dev", "test"}
    assert result.summary["methods"]["full"]["test"] is not None


@pytest.mark.slow
def test_campaign_metrics_reach_rays_prometheus_export(cluster, model_dir, tmp_path):
    # A name no other test uses: the driver's counters live as long as the module's Ray.
    cfg = make_config(model_dir, tmp_path / "run", name="ray-metrics")
    pool = RayPool(spec_of(cfg), cfg, build=fake_build(seconds=0.05, raise_for={"eep-00003"}),
                   poll_seconds=0.1)
    Campaign(cfg, quiet=True, pool=pool).run()
    records = RunLog.open(tmp_path / "run").records
    expected: dict[tuple[str, str], float] = {}
    for r in records:
        failed = bool(r["error"]) or r["score"] is None or not math.isfinite(r["score"])
        name = "ray_eep_evaluations_failed_total" if failed else "ray_eep_evaluations_done_total"
        for key in ((name, r["split"]), ("ray_eep_evaluation_seconds_count", r["split"])):
            expected[key] = expected.get(key, 0.0) + 1
    search_scores = [r["score"] for r in records if r["split"] == "search" and not r["error"]]
    expected[("ray_eep_best_score", "")] = max(search_scores)
    expected[("ray_eep_workers", "")] = 2.0
    assert expected[("ray_eep_evaluations_failed_total", "search")] == 1  # eep-00003
    assert {split for _, split in expected} == {"", "search", "dev", "test"}

    deadline = time.monotonic() + 60
    while True:  # Ray exports what the driver recorded every report interval
        seen = scrape_eep_metrics("ray-metrics")
        buckets = {k: v for k, v in seen.items() if "_bucket" in k[0]}
        if all(seen.get(k) == v for k, v in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {k: seen.get(k) for k in expected} == expected
    assert seen.keys() - buckets.keys() == expected.keys()
    # Cumulative histogram buckets: evaluations of at most `le` seconds.
    assert len(buckets) > 3 * 2
    for (name, split), count in buckets.items():
        le = float(name.rsplit("le=", 1)[1])
        assert count == sum(r["seconds"] <= le for r in records if r["split"] == split), name


@pytest.mark.slow
def test_campaign_with_kl_fitness_and_early_rejection_on_actors(cluster, model_dir, tmp_path):
    cfg = make_config(
        model_dir, tmp_path / "run", fitness={"kind": "kl", "early_rejection": {"confidence": 0.6, "slice": 2}},
        final={"random_baselines": 1, "dev_top": 2},
    )
    result = run_campaign(cfg, quiet=True)
    records = RunLog.open(tmp_path / "run").records
    search = [r for r in records if r["split"] == "search"]
    assert len(search) == 25 and {r["worker"] for r in search} <= {"ray-0", "ray-1"}
    assert {(r["fitness"], r["metric"]) for r in search} == {("kl", "neg_kl")}
    rejected = [r for r in search if r["rejected"]]
    assert rejected and all(r["count"] < r["total"] == 10 for r in rejected)
    assert result.summary["search_rejected"] == len(rejected)
    assert result.summary["search_examples"] == sum(r["count"] for r in search) < 25 * 10
    # dev and test score the task's own metric on every example
    held_out = [r for r in records if r["split"] != "search"]
    assert {(r["fitness"], r["metric"], r["rejected"]) for r in held_out} == {("accuracy", "exact_match", False)}


@pytest.mark.slow
def test_campaign_with_a_global_budget_and_polishing_on_actors(cluster, model_dir, tmp_path):
    """Per-layer budgets and the polishing job run on the actors as in process."""
    cfg = make_config(
        model_dir, tmp_path / "run", keep=3, keep_min=2, keep_max=4, polish={"steps": 8},
        final={"random_baselines": 1, "dev_top": 2},
    )
    result = run_campaign(cfg, quiet=True)
    records = RunLog.open(tmp_path / "run").records
    search = [r for r in records if r["split"] == "search"]
    assert len(search) == 25 and {r["worker"] for r in search} <= {"ray-0", "ray-1"}
    run = RunLog.open(tmp_path / "run")
    keeps = {tuple(run.load_candidate(r["id"]).keep_per_layer) for r in search}
    assert all(sum(k) == 6 and all(2 <= x <= 4 for x in k) for k in keeps) and len(keeps) > 1
    done = json.loads((tmp_path / "run" / "polish.json").read_text())
    assert done["worker"] in {"ray-0", "ray-1"} and done["steps"] == 8
    row = result.summary["methods"]["polish"]
    assert row["kl_after"] <= row["kl_before"] and row["dev"] is not None and row["test"] is not None
