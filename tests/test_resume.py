"""Resume from the state a crash really leaves: a stale checkpoint, records to replay, jobs in flight.

A crash (SIGKILL, OOM killer, lost node) skips the search loop's exit checkpoint, so the run
directory holds every record appended so far and a checkpoint up to `checkpoint_every - 1` records
older. We capture exactly that state by copying the run directory from inside the pool's `wait`
(while a job is in flight) or just before a checkpoint is written, and let the original run go on
to its end: the copy is a killed run, the original is the uninterrupted one. Evaluations are real:
`InProcessPool` + `Evaluator` on a tiny random Mixtral, so every decision depends on real scores.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from eep.campaign import Campaign, run_campaign
from eep.candidate import Candidate
from eep.config import CampaignConfig, config_from_dict
from eep.distributed.pool import InProcessPool, Job, WorkerSpec, build_evaluators
from eep.models.testing import save_tiny_model
from eep.runlog import BEST_FILE, CHECKPOINT_FILE, EVALUATIONS_FILE, SUMMARY_FILE

# A dense search metric (label_prob), so that candidates differ and the search's choices matter.
TASK = {
    "name": "compare",
    "source": {"kind": "builtin", "name": "compare"},
    "scorer": "multiple_choice",
    "search_metric": "label_prob",
    "splits": {"search": 8, "dev": 4, "test": 4, "seed": 0},
}
SEARCH_EVALUATIONS = 31  # total_iter + 1
# Fields that are wall-clock measurements; everything else in a record is a decision or a score.
TIMING = {"time", "elapsed", "seconds"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Mixtral with the character tokenizer, saved as a model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "mixtral")


@pytest.fixture(scope="module")
def evaluators(model_dir) -> tuple[WorkerSpec, dict]:
    """One set of real evaluators, shared by every pool in this module (the model loads once)."""
    spec = WorkerSpec(model=model_dir, task=TASK, splits=("search", "dev", "test"))
    return spec, build_evaluators(spec)


def make_config(model_dir: str, run_dir: Path, checkpoint_every: int = 7, **extra) -> CampaignConfig:
    return config_from_dict(
        {
            **extra,
            "name": "resume",
            "model": model_dir,
            "task": TASK,
            "keep": 4,
            "strategy": {"kind": "eep", "init_population": 6, "discrete_iter": 15, "total_iter": 30, "dev_top": 3},
            "final": {"random_baselines": 2},
            "output": {"run_dir": str(run_dir), "export": False, "checkpoint_every": checkpoint_every},
            "seed": 5,
        }
    )


class SeveralWorkers:
    """`workers` real InProcessPools on shared evaluators; jobs complete in a seeded scrambled order.

    The evaluations are the real ones; only the concurrency is simulated, which is what the
    campaign sees of several workers: more than one job in flight, results out of submission order.
    """

    def __init__(self, spec: WorkerSpec, evaluators: dict, workers: int, seed: int = 0) -> None:
        self.slots = [InProcessPool(spec, evaluators) for _ in range(workers)]
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.slots)

    def idle(self) -> int:
        return sum(s.idle() for s in self.slots)

    def submit(self, job: Job) -> None:
        # Queued on the least busy worker: the final phase submits more jobs than there are workers.
        min(self.slots, key=lambda s: s.in_flight).submit(job)

    def wait(self, timeout: float | None = None) -> list[Job]:
        busy = [i for i, s in enumerate(self.slots) if s.in_flight]
        if not busy:
            return []
        slot = busy[int(torch.randint(len(busy), (1,), generator=self.gen))]
        jobs = self.slots[slot].wait()
        for job in jobs:
            job.worker = f"w{slot}"
        return jobs

    def close(self) -> None:
        for s in self.slots:
            s.close()


class CrashCopies:
    """Wraps a pool; when the run directory holds N records, copies it to `points[N]` before waiting.

    At that moment the next job is in flight and no checkpoint has been written since the last
    `checkpoint_every` multiple: the copy is what a SIGKILL at that moment would leave.
    """

    def __init__(self, pool, run_dir: Path, points: dict[int, Path]) -> None:
        self.pool, self.run_dir, self.points = pool, Path(run_dir), dict(points)
        self.in_flight_at_copy: dict[int, list[str]] = {}
        self._queued: list[Job] = []

    @property
    def size(self) -> int:
        return self.pool.size

    @property
    def in_flight(self) -> int:
        return self.pool.in_flight

    def idle(self) -> int:
        return self.pool.idle()

    def submit(self, job: Job) -> None:
        self._queued.append(job)
        self.pool.submit(job)

    def wait(self, timeout: float | None = None) -> list[Job]:
        records = len(read_lines(self.run_dir))
        if records in self.points:
            shutil.copytree(self.run_dir, self.points.pop(records))
            self.in_flight_at_copy[records] = [j.candidate.id for j in self._queued if j.candidate is not None]
        jobs = self.pool.wait(timeout)
        done = {id(j) for j in jobs}
        self._queued = [j for j in self._queued if id(j) not in done]
        return jobs

    def close(self) -> None:
        self.pool.close()


def read_lines(run_dir: Path) -> list[bytes]:
    path = Path(run_dir) / EVALUATIONS_FILE
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def decisions(run_dir: Path) -> list[dict]:
    """Every record (search, dev, test) without its wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in read_lines(run_dir)]


def summary_of(run_dir: Path) -> dict:
    summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    summary.pop("search_seconds")
    return summary


def search_count(run_dir: Path) -> int:
    return sum(1 for r in decisions(run_dir) if r["split"] == "search")


def resume(cfg: CampaignConfig, run_dir: Path, pool, check: Callable[[Campaign], None] | None = None) -> Campaign:
    """Resume `run_dir` to the end; `check` sees the campaign right after its replay."""
    campaign = Campaign(cfg, run_dir=run_dir, resume=True, quiet=True, pool=pool)
    if check is not None:
        check(campaign)
    campaign.run()
    return campaign


def replays(n: int) -> Callable[[Campaign], None]:
    """A check that the resume replayed exactly `n` records written after the checkpoint."""

    def check(campaign: Campaign) -> None:
        assert campaign.replayed == n

    return check


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same records (ids, hashes, scores, asked counts, workers), same summary, same best candidate."""
    assert decisions(resumed) == decisions(reference)
    assert summary_of(resumed) == summary_of(reference)
    best = Candidate.load(Path(resumed) / BEST_FILE).content_hash()
    assert best == Candidate.load(Path(reference) / BEST_FILE).content_hash()


@pytest.mark.parametrize(
    ("checkpoint_every", "kills"),
    [
        # kill point (records in the log) -> records written after the last checkpoint
        (7, {3: 3, 10: 3, 21: 0, 27: 6}),
        (1000, {4: 4, 20: 20}),  # no checkpoint yet: everything is replayed from the start
    ],
)
def test_kill_with_a_stale_checkpoint_replays_and_makes_the_same_decisions(
    tmp_path, model_dir, evaluators, checkpoint_every, kills
):
    spec, evals = evaluators
    ref = tmp_path / "ref"
    copies = {n: tmp_path / f"killed-at-{n}" for n in kills}
    pool = CrashCopies(InProcessPool(spec, evals), ref, copies)
    run_campaign(make_config(model_dir, ref, checkpoint_every), quiet=True, pool=pool)
    assert search_count(ref) == SEARCH_EVALUATIONS
    assert not pool.points, f"kill points never reached: {sorted(pool.points)}"

    for point, replayed in kills.items():
        killed = copies[point]
        before = read_lines(killed)
        assert len(before) == point  # some but not all records: killed mid-search
        assert pool.in_flight_at_copy[point], "a job was in flight at the kill"

        def check(campaign: Campaign, point: int = point, replayed: int = replayed) -> None:
            assert campaign.replayed == replayed
            assert campaign.progress.search_records == point
            # One worker: the job in flight was asked after the last record, so the replay stops
            # short of it and the search asks it again (same state, same candidate).
            assert campaign.strategy.pending() == [] and campaign.progress.asked == point

        resume(make_config(model_dir, ref, checkpoint_every), killed, InProcessPool(spec, evals), check)
        assert read_lines(killed)[:point] == before  # the killed run's records kept byte for byte
        assert [json.loads(line)["id"] for line in read_lines(killed)[point:point + 1]] == pool.in_flight_at_copy[point]
        assert_same_run(killed, ref)


def test_kill_between_record_and_checkpoint_then_kill_again(tmp_path, model_dir, evaluators):
    """Killed while the checkpoint is written (a torn .tmp beside the old one), resumed, killed again."""
    spec, evals = evaluators
    ref = tmp_path / "ref"
    run_campaign(make_config(model_dir, ref), quiet=True, pool=InProcessPool(spec, evals))

    first = tmp_path / "first"
    campaign = Campaign(make_config(model_dir, first), quiet=True, pool=InProcessPool(spec, evals))
    write_checkpoint = campaign.runlog.write_checkpoint
    copied: list[int] = []

    def copy_then_write(state: dict) -> None:
        if not copied and state["search_records"] == 14:  # the second periodic checkpoint
            shutil.copytree(first, tmp_path / "killed")
            (tmp_path / "killed" / (CHECKPOINT_FILE + ".tmp")).write_bytes(b"torn checkpoint")
            copied.append(state["search_records"])
        write_checkpoint(state)

    campaign.runlog.write_checkpoint = copy_then_write
    campaign.run()
    assert copied == [14]

    # Record 14 was appended, its checkpoint never landed: the one at 7 is the newest, 7 replayed.
    killed = tmp_path / "killed"
    cfg = make_config(model_dir, first)
    again = tmp_path / "killed-again"
    pool = CrashCopies(InProcessPool(spec, evals), killed, {19: again})
    resume(cfg, killed, pool, replays(7))
    assert_same_run(killed, ref)

    # A resume does not checkpoint after its replay; the next one is due at 21, so when killed at
    # 19 the checkpoint at 7 is still the newest: 12 to replay.
    resume(cfg, again, InProcessPool(spec, evals), replays(12))
    assert_same_run(again, ref)


def test_kill_in_the_final_phase_reuses_recorded_scores(tmp_path, model_dir, evaluators):
    spec, evals = evaluators
    ref = tmp_path / "ref"
    killed = tmp_path / "killed"
    at = SEARCH_EVALUATIONS + 2  # two dev scores recorded, a third in flight
    run_campaign(make_config(model_dir, ref), quiet=True, pool=CrashCopies(InProcessPool(spec, evals), ref, {at: killed}))
    assert [json.loads(x)["split"] for x in read_lines(killed)][-3:] == ["search", "dev", "dev"]

    # The search loop ended normally, so its exit checkpoint is there: nothing to replay.
    resume(make_config(model_dir, ref), killed, InProcessPool(spec, evals), replays(0))
    assert_same_run(killed, ref)  # the two dev records are not scored again


def test_resume_with_three_workers_keeps_every_record(tmp_path, model_dir, evaluators):
    spec, evals = evaluators
    first = tmp_path / "first"
    killed = tmp_path / "killed"
    pool = CrashCopies(SeveralWorkers(spec, evals, 3), first, {10: killed})
    run_campaign(make_config(model_dir, first, checkpoint_every=4), quiet=True, pool=pool)
    assert len({r["worker"] for r in decisions(first)}) == 3
    before = (killed / EVALUATIONS_FILE).read_bytes()
    in_flight = pool.in_flight_at_copy[10]
    assert len(in_flight) == 3  # every worker busy at the kill

    def check(campaign: Campaign) -> None:
        assert campaign.replayed == 2  # records 9 and 10; the checkpoint is from record 8
        # Jobs asked before the last record are re-submitted from the strategy's pending list; the
        # one asked after it is asked again.
        pending = [c.id for c in campaign.strategy.pending()]
        assert pending and set(pending) < set(in_flight)

    resume(make_config(model_dir, first, checkpoint_every=4), killed, SeveralWorkers(spec, evals, 3, seed=1), check)
    after = (killed / EVALUATIONS_FILE).read_bytes()
    assert before.endswith(b"\n") and after.startswith(before)  # the first run's records, byte for byte
    search = [r for r in decisions(killed) if r["split"] == "search"]
    assert len(search) == SEARCH_EVALUATIONS
    assert len({r["hash"] for r in search}) == len({r["id"] for r in search}) == SEARCH_EVALUATIONS
    assert set(in_flight) <= {r["id"] for r in search[10:]}  # the jobs in flight were scored after resume
    assert summary_of(killed)["search_evaluations"] == SEARCH_EVALUATIONS


REJECTION = {"early_rejection": {"confidence": 0.6, "slice": 2}}


def test_kill_mid_rejection_resumes_to_the_same_run(tmp_path, model_dir):
    """Early rejection: the kills land while a candidate that gets rejected is in flight."""
    spec = WorkerSpec(model=model_dir, task=TASK, splits=("search", "dev", "test"), rejection=(0.6, 2))
    evals = build_evaluators(spec)
    ref = tmp_path / "ref"
    run_campaign(make_config(model_dir, ref, fitness=REJECTION), quiet=True, pool=InProcessPool(spec, evals))
    search = [r for r in decisions(ref) if r["split"] == "search"]
    rejected = [i for i, r in enumerate(search) if r["rejected"]]
    assert len(search) == SEARCH_EVALUATIONS and len(rejected) >= 3
    assert all(search[i]["count"] < search[i]["total"] == 8 for i in rejected)
    assert summary_of(ref)["search_rejected"] == len(rejected)
    # Kill with a rejected candidate in flight (its record is the next one); one kill with a
    # checkpoint, one where every record (the rejected ones among them) is replayed.
    for every, kill in ((7, rejected[1]), (1000, rejected[-1])):
        first, killed = tmp_path / f"first-{every}", tmp_path / f"killed-{every}"
        pool = CrashCopies(InProcessPool(spec, evals), first, {kill: killed})
        run_campaign(make_config(model_dir, first, every, fitness=REJECTION), quiet=True, pool=pool)
        assert_same_run(first, ref)

        def check(campaign: Campaign, kill: int = kill) -> None:
            # The replayed strategy knows which of its candidates were rejected.
            flags = [e.rejected for e in campaign.strategy.archive]
            assert flags == [r["rejected"] for r in search[:kill]] and any(flags)

        resume(make_config(model_dir, ref, every, fitness=REJECTION), killed, InProcessPool(spec, evals), check)
        assert_same_run(killed, ref)
