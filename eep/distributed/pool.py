"""The EvaluatorPool interface and its in-process implementation.

A pool scores candidates asynchronously: `submit` a job, then `wait` for the ones that have
completed (in completion order, not submission order). The campaign keeps every worker busy by
submitting a new job as soon as one completes (steady state, no generation barrier).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from eep.candidate import Candidate
from eep.result import FitnessResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to build its Evaluator once."""

    model: str
    task: dict  # TaskSpec as a plain mapping (crosses process boundaries cheaply)
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 32
    originals_on_cpu: bool = False
    threads: int | None = None
    trust_remote_code: bool = False
    # "auto": one replica spread over every visible GPU (a Ray actor given several GPUs).
    device_map: str | None = None
    # Splits each worker prepares; the search split is the one candidates are scored on.
    splits: tuple[str, ...] = ("search",)
    # What the search split measures (eep.forced) and, when set, early rejection's
    # (confidence, slice); dev and test always score the task's metric on every example.
    fitness: str = "accuracy"
    kl_top: int = 64
    rejection: tuple[float, int] | None = None


class PoolError(RuntimeError):
    """The pool cannot go on (e.g. every worker lost); the run directory stays resumable."""


@dataclass
class Job:
    """One candidate to score on one split; `result` and `worker` are set on completion.

    A polishing job (`polish`: `PolishSettings` as a mapping) tunes the candidate's coefficients
    on the split instead (`eep.polish`); `output` is then the polished candidate and `result`
    its KL on the split (metric neg_kl).
    """

    candidate: Candidate | None  # None: the unpruned model
    split: str = "search"
    reject_below: float | None = None  # early rejection threshold (search split only)
    polish: dict | None = None
    result: FitnessResult | None = None
    output: Candidate | None = None
    worker: str = ""
    submitted: float = field(default_factory=time.time)


class EvaluatorPool(Protocol):
    """Workers that score candidates; results come back as they complete."""

    @property
    def size(self) -> int:
        """Workers alive now."""
        ...

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet returned by `wait`."""
        ...

    def idle(self) -> int:
        """How many more jobs can start at once (free workers)."""
        ...

    def submit(self, job: Job) -> None:
        """Queue a job; it starts when a worker is free."""
        ...

    def wait(self, timeout: float | None = None) -> list[Job]:
        """Completed jobs (at least one unless `timeout` passes or none is in flight)."""
        ...

    def close(self) -> None:
        """Release the workers."""
        ...


class InProcessPool:
    """One Evaluator in this process: `wait` runs the next queued job to completion.

    An evaluation that raises is returned as a failed result with its message, so one bad
    candidate cannot stop a campaign.
    """

    def __init__(self, spec: WorkerSpec, evaluators: dict | None = None) -> None:
        self.spec = spec
        self._queue: deque[Job] = deque()
        self._evaluators = evaluators if evaluators is not None else build_evaluators(spec)

    @property
    def size(self) -> int:
        """One worker: this process."""
        return 1

    @property
    def in_flight(self) -> int:
        """Queued jobs."""
        return len(self._queue)

    def idle(self) -> int:
        """1 when nothing is queued: jobs run one at a time."""
        return 0 if self._queue else 1

    def submit(self, job: Job) -> None:
        """Queue a job."""
        self._queue.append(job)

    def wait(self, timeout: float | None = None) -> list[Job]:
        """Run the oldest queued job and return it."""
        if not self._queue:
            return []
        job = self._queue.popleft()
        job.result, job.output = execute(self._evaluators, job)
        job.worker = "local"
        return [job]

    def close(self) -> None:
        """Nothing to release."""
        self._queue.clear()


def build_evaluators(spec: WorkerSpec) -> dict:
    """One Evaluator per split, sharing one loaded model and one Surgery."""
    import torch

    from eep.fitness import Evaluator
    from eep.models.loading import load_model
    from eep.rejection import RejectionRule
    from eep.tasks.spec import TaskSpec

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(
        spec.model, device=device, dtype=spec.dtype, device_map=spec.device_map,
        trust_remote_code=spec.trust_remote_code,
    )
    task = TaskSpec.from_dict(spec.task)
    evaluators: dict = {}
    for split in spec.splits:
        search = split == "search"
        evaluators[split] = Evaluator(
            loaded,
            task,
            split=split,
            device=device,
            batch_size=spec.batch_size,
            originals_device="cpu" if spec.originals_on_cpu else None,
            fitness=spec.fitness if search else "accuracy",
            kl_top=spec.kl_top,
            rejection=RejectionRule(*spec.rejection) if search and spec.rejection else None,
        )
    return evaluators


def execute(evaluators: dict, job: Job) -> tuple[FitnessResult, Candidate | None]:
    """Run a job: (its result, the polished candidate of a polishing job, else None)."""
    if job.polish is None:
        return run_job(evaluators, job), None
    return polish_job(evaluators, job)


def polish_job(evaluators: dict, job: Job) -> tuple[FitnessResult, Candidate | None]:
    """Polish the job's candidate on its split; a Python error becomes a failed result."""
    from eep.config import PolishSettings
    from eep.polish import polish_on_split

    evaluator = _evaluator(evaluators, job.split)
    try:
        outcome = polish_on_split(evaluator, job.candidate, PolishSettings(**job.polish))
    except Exception as exc:  # noqa: BLE001  (as in run_job: the campaign keeps the unpolished one)
        log.warning("polishing failed: %s", exc)
        log.debug("%s", traceback.format_exc())
        return FitnessResult.failure(f"{type(exc).__name__}: {exc}", split=job.split), None
    result = FitnessResult(
        score=-outcome.kl_after, metric="neg_kl", count=len(evaluator.examples), seconds=outcome.seconds,
        split=job.split, fitness="kl", total=len(evaluator.examples),
        metrics={"neg_kl": -outcome.kl_after, "neg_kl_before": -outcome.kl_before, "steps": float(outcome.steps)},
    )
    return result, outcome.candidate


def run_job(evaluators: dict, job: Job) -> FitnessResult:
    """Score one job; a Python error becomes a failed result carrying its message."""
    evaluator = _evaluator(evaluators, job.split)
    try:
        if job.reject_below is None:  # evaluators without early rejection keep working
            return evaluator.evaluate(job.candidate)
        return evaluator.evaluate(job.candidate, reject_below=job.reject_below)
    except Exception as exc:  # noqa: BLE001  (a failed evaluation is data, not a crash)
        log.warning("evaluation failed: %s", exc)
        log.debug("%s", traceback.format_exc())
        return FitnessResult.failure(f"{type(exc).__name__}: {exc}", split=job.split)


def _evaluator(evaluators: dict, split: str):
    """The worker's evaluator of `split`, made (on the same model replica) the first time it is asked."""
    evaluator = evaluators.get(split)
    if evaluator is None:
        evaluator = evaluators[split] = next(iter(evaluators.values())).for_split(split)
    return evaluator
