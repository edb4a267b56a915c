"""RayPool: an EvaluatorPool of Ray actors, each holding one model replica.

- One actor per worker, with the campaign's `resources` (num_gpus, num_cpus, memory_gb). An actor
  builds its Evaluators once (`build_evaluators`: model loaded once, originals cached, splits
  tokenized once); an actor with several GPUs loads its replica across them (`device_map="auto"`,
  the originals stay next to their layers). The WorkerSpec goes through the object store once;
  candidates (a few small tensors) are sent with each call.
- Steady state: a job starts as soon as a ready actor is free; `wait` returns jobs as they
  complete (`ray.wait`), with `job.worker` set to the actor's name. No generation barrier.
- Faults: an actor that dies (killed, node lost, out of memory) has its job re-queued (first in
  line) and is replaced while the restart budget lasts (`max_restarts`, default 3 per worker;
  preemptions are not counted); after that the pool goes on with fewer workers and says so. A job
  whose actor died `max_attempts` times comes back as a failed result (a candidate that kills
  every worker must not take the campaign with it). A Python error inside an evaluation is a
  failed result (`run_job`), the actor lives on. An actor whose constructor raised (bad model
  path, missing package) is not replaced: the same error would come back. With no worker left
  and none that can come, `wait` raises `PoolError`; the campaign checkpoints in its `finally`,
  so the run directory resumes with `eep search --resume`.
- Elasticity: every `poll_seconds` inside `wait`, vacant slots (up to `workers`) get new actors
  when `ray.available_resources()` fits them; on a cluster we joined, the autoscaler is told the
  full demand (`request_resources`), so it can add nodes. A shrinking cluster kills actors: that
  is the fault path above, and the replacement waits for resources.

Jobs go only to actors whose constructor has finished, so a job never waits behind an actor that
is still pending for resources; the constructor blocks until the first actor is ready.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from eep.candidate import Candidate
from eep.config import CampaignConfig
from eep.distributed import ray_runtime
from eep.distributed.pool import Job, PoolError, WorkerSpec, build_evaluators, execute, run_job
from eep.result import FitnessResult

log = logging.getLogger(__name__)

DEFAULT_RESTARTS_PER_WORKER = 3
DEFAULT_MAX_ATTEMPTS = 3  # times one job may lose its actor before it is recorded as failed
DEFAULT_POLL_SECONDS = 5.0
DEFAULT_STARTUP_TIMEOUT = 1800.0  # an autoscaler may need minutes for a GPU node, then the model loads


class EvaluatorActor:
    """One model replica in a Ray actor: builds its Evaluators once, then scores candidates."""

    def __init__(self, spec: WorkerSpec, name: str, build: Callable[[WorkerSpec], dict] | None = None):
        self.name = name
        self.evaluators = (build or build_evaluators)(spec)

    def ready(self) -> str:
        """Returns once the constructor has finished (the model is loaded)."""
        return self.name

    def evaluate(
        self, candidate: Candidate | None, split: str, reject_below: float | None = None
    ) -> FitnessResult:
        """Score one candidate; a Python error comes back as a failed result."""
        return run_job(self.evaluators, Job(candidate, split, reject_below))

    def run(
        self, candidate: Candidate | None, split: str, reject_below: float | None, polish: dict | None
    ) -> tuple[FitnessResult, Candidate | None]:
        """Score (or polish) one candidate: (result, polished candidate or None)."""
        return execute(self.evaluators, Job(candidate, split, reject_below, polish))


def actor_demand(num_cpus: float, num_gpus: float, memory_gb: float | None) -> dict[str, float]:
    """One actor's resources in Ray's names (memory in bytes)."""
    demand = {"CPU": float(num_cpus), "GPU": float(num_gpus)}
    if memory_gb:
        demand["memory"] = memory_gb * 2**30
    return {k: v for k, v in demand.items() if v > 0}


def actor_spec(spec: WorkerSpec, num_gpus: float, num_cpus: float) -> WorkerSpec:
    """The WorkerSpec an actor with these resources builds from."""
    if num_gpus > 1 and spec.device_map is None:
        # One replica across the actor's GPUs; Surgery keeps originals next to their layers.
        spec = dataclasses.replace(spec, device_map="auto")
    if spec.threads is None and num_cpus >= 1:
        # One torch thread per reserved CPU: more would fight the actor's neighbours.
        spec = dataclasses.replace(spec, threads=int(num_cpus))
    return spec


def actors_that_fit(available: dict[str, float], demand: dict[str, float], wanted: int,
                    reserved: int = 0) -> int:
    """How many more actors of `demand` to start: what `available` holds beyond `reserved` ones.

    `reserved` actors were started but may not hold their resources yet; counting them again
    errs on the side of starting too few (the next poll starts the rest) rather than too many
    (an actor pending for resources that never come).
    """
    if wanted <= 0:
        return 0
    fit = wanted
    for resource, amount in demand.items():
        free = available.get(resource, 0.0) - reserved * amount
        fit = min(fit, max(0, math.floor(free / amount + 1e-9)))
    return fit


@dataclass
class _Worker:
    """One actor and what it is doing."""

    name: str
    handle: ray.actor.ActorHandle
    ready: bool = False
    job: Job | None = None
    ref: ray.ObjectRef | None = None
    started: float = field(default_factory=time.monotonic)


class RayPool:
    """Ray actors scoring candidates (see the module docstring)."""

    def __init__(
        self,
        spec: WorkerSpec,
        config: CampaignConfig,
        *,
        max_restarts: int | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        build: Callable[[WorkerSpec], dict] | None = None,
    ) -> None:
        resources = config.resources
        self.target = max(1, config.workers)  # an address with workers: 0 still means one actor
        if max_restarts is None:
            max_restarts = config.max_worker_restarts
        self.max_restarts = (
            DEFAULT_RESTARTS_PER_WORKER * self.target if max_restarts is None else max_restarts
        )
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.startup_timeout = startup_timeout
        self.demand = actor_demand(resources.num_cpus, resources.num_gpus, resources.memory_gb)
        self._options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                         "max_restarts": 0, "max_task_retries": 0}
        if resources.memory_gb:
            self._options["memory"] = int(resources.memory_gb * 2**30)
        self.spec = spec = actor_spec(spec, resources.num_gpus, resources.num_cpus)
        self._owns_ray = ray_runtime.connect(config.ray_address)
        self._spec_ref = ray.put(spec)  # once: every actor reads the same object
        self._build = build
        self._actor_class = ray.remote(EvaluatorActor)
        self._workers: dict[str, _Worker] = {}
        self._by_ref: dict[ray.ObjectRef, _Worker] = {}  # job refs and readiness refs
        self._queue: deque[Job] = deque()
        self._attempts: dict[int, int] = {}
        self._created = 0
        self._deaths = 0
        self._init_error: str | None = None
        self._last_grow = -math.inf
        self._empty_since: float | None = None
        self._autoscale = not self._owns_ray
        try:
            self._start(startup_timeout)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------- protocol
    @property
    def size(self) -> int:
        """Actors alive now (ready or loading)."""
        return len(self._workers)

    @property
    def in_flight(self) -> int:
        """Jobs queued or running."""
        return len(self._queue) + sum(1 for w in self._workers.values() if w.job is not None)

    @property
    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        """Live actors by name (for inspection and fault-injection tests)."""
        return {name: w.handle for name, w in self._workers.items()}

    @property
    def deaths(self) -> int:
        """Actor deaths counted against the restart budget (preemptions and failed starts are not)."""
        return self._deaths

    @property
    def running(self) -> dict[str, Job]:
        """The job each busy actor is evaluating now, by actor name."""
        return {name: w.job for name, w in self._workers.items() if w.job is not None}

    def idle(self) -> int:
        """Ready actors without a job, less the jobs already queued for them."""
        free = sum(1 for w in self._workers.values() if w.ready and w.job is None)
        return max(0, free - len(self._queue))

    def submit(self, job: Job) -> None:
        """Queue a job; it starts on the next free ready actor."""
        self._queue.append(job)
        self._dispatch()

    def wait(self, timeout: float | None = None) -> list[Job]:
        """Completed jobs; returns early (maybe empty) when a new actor is ready to take one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._grow()
            self._dispatch()
            if not self._queue and not any(w.job for w in self._workers.values()):
                # Nothing to return; with a timeout, let loading actors become ready meanwhile.
                if deadline is not None and self._by_ref:
                    self._collect(max(0.0, deadline - time.monotonic()))
                return []
            self._check_not_empty()
            step = self.poll_seconds
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            completed, grew = self._collect(step)
            if completed or grew:
                self._dispatch()
                return completed
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def close(self) -> None:
        """Kill the actors; stop the local Ray if this pool started it."""
        for worker in list(self._workers.values()):
            self._kill(worker)
        self._workers.clear()
        self._by_ref.clear()
        self._queue.clear()
        if self._autoscale and ray.is_initialized():
            self._request_resources(0)
        if self._owns_ray:
            ray_runtime.shutdown()
            self._owns_ray = False

    # ----------------------------------------------------------------------------- start-up
    def _start(self, timeout: float) -> None:
        """Start the actors that fit; block until one is ready."""
        if self._autoscale:
            self._request_resources(self.target)
        deadline = time.monotonic() + timeout
        self._grow(force=True)
        if not self._workers and self._owns_ray:
            # Nothing will join a Ray we started here: waiting cannot help.
            raise PoolError(
                f"one worker asks for {self.demand}, this machine's Ray has "
                f"{ray.available_resources()}: lower `resources` or join a cluster (ray_address)"
            )
        while not any(w.ready for w in self._workers.values()):
            if not self._workers and not self._can_get_workers():
                raise PoolError(self._lost_message())
            if time.monotonic() >= deadline:
                raise PoolError(
                    f"no worker was ready within {timeout:.0f} s; one worker asks for "
                    f"{self.demand}, the cluster has {ray.available_resources()} available"
                )
            self._collect(self.poll_seconds)
            self._grow()
        log.info("Ray pool: %d of %d workers started, %s each",
                 len(self._workers), self.target, self.demand)

    def _grow(self, force: bool = False) -> int:
        """Start actors for vacant slots that the cluster's free resources fit."""
        now = time.monotonic()
        if not force and now - self._last_grow < self.poll_seconds:
            return 0
        self._last_grow = now
        vacant = self.target - len(self._workers)
        if vacant <= 0:
            return 0
        starting = sum(1 for w in self._workers.values() if not w.ready)
        count = actors_that_fit(ray.available_resources(), self.demand, vacant, reserved=starting)
        for _ in range(count):
            self._create()
        if count and self._created > count:
            log.info("Ray pool: started %d more worker(s), %d alive", count, len(self._workers))
        return count

    def _create(self) -> None:
        name = f"ray-{self._created}"
        self._created += 1
        handle = self._actor_class.options(**self._options).remote(self._spec_ref, name, self._build)
        worker = _Worker(name, handle)
        self._workers[name] = worker
        self._by_ref[handle.ready.remote()] = worker

    def _check_not_empty(self) -> None:
        """Raise PoolError when no worker is left and none can come (in time)."""
        if self._workers:
            self._empty_since = None
            return
        if not self._can_get_workers():
            raise PoolError(self._lost_message())
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
        elif now - self._empty_since > self.startup_timeout:
            raise PoolError(f"{self._lost_message()}; no new worker came within "
                            f"{self.startup_timeout:.0f} s")

    def _can_get_workers(self) -> bool:
        """Whether a vacant slot may still be filled (by the autoscaler or a joining node)."""
        return self.target > 0 and not (self._owns_ray and self._init_error)

    def _request_resources(self, count: int) -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[self.demand] * count)
        except Exception as exc:  # noqa: BLE001  (a hint to an autoscaler that may not exist)
            log.debug("request_resources: %s", exc)

    # ----------------------------------------------------------------------------- jobs
    def _dispatch(self) -> None:
        """Give queued jobs to free ready actors."""
        for worker in self._workers.values():
            if not self._queue:
                return
            if worker.ready and worker.job is None:
                job = self._queue.popleft()
                worker.job = job
                worker.ref = worker.handle.run.remote(job.candidate, job.split, job.reject_below, job.polish)
                self._by_ref[worker.ref] = worker

    def _collect(self, timeout: float) -> tuple[list[Job], bool]:
        """(jobs completed, whether an actor became ready) within `timeout` seconds."""
        if not self._by_ref:
            time.sleep(timeout)
            return [], False
        refs = list(self._by_ref)
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if done:  # take everything else that is already finished too
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        completed: list[Job] = []
        grew = False
        for ref in done:
            worker = self._by_ref.pop(ref, None)
            if worker is None:
                continue
            if ref == worker.ref:
                job = self._finish(worker, ref)
                if job is not None:
                    completed.append(job)
            else:
                grew |= self._on_ready(worker, ref)
        return completed, grew

    def _on_ready(self, worker: _Worker, ref: ray.ObjectRef) -> bool:
        try:
            ray.get(ref)
        except RayError as exc:
            self._lose(worker, exc)
            return False
        worker.ready = True
        log.info("Ray pool: %s ready after %.1f s", worker.name, time.monotonic() - worker.started)
        return True

    def _finish(self, worker: _Worker, ref: ray.ObjectRef) -> Job | None:
        """The job of a finished ref, or None when it goes back in the queue."""
        job = worker.job
        assert job is not None
        worker.job, worker.ref = None, None
        output = None
        try:
            result, output = ray.get(ref)
        except RayTaskError as exc:
            # The method raised outside run_job's guard (e.g. the result would not pickle).
            result = FitnessResult.failure(f"{type(exc.cause).__name__}: {exc.cause}", split=job.split)
        except RayError as exc:
            self._lose(worker, exc)
            return self._retry(job, exc)
        worker.ready = True
        job.result, job.output, job.worker = result, output, worker.name
        self._attempts.pop(id(job), None)
        return job

    def _retry(self, job: Job, exc: BaseException) -> Job | None:
        attempts = self._attempts.get(id(job), 0) + 1
        self._attempts[id(job)] = attempts
        if attempts >= self.max_attempts:
            self._attempts.pop(id(job), None)
            job.result = FitnessResult.failure(
                f"WorkerLost: the worker died {attempts} times evaluating this candidate; "
                f"last: {_first_line(exc)}",
                split=job.split,
            )
            job.worker = "lost"
            return job
        self._queue.appendleft(job)  # first in line: it has waited longest
        return None

    # ----------------------------------------------------------------------------- faults
    def _lose(self, worker: _Worker, exc: BaseException) -> None:
        """Drop a dead actor; its slot is refilled while the restart budget lasts."""
        self._workers.pop(worker.name, None)
        self._by_ref = {r: w for r, w in self._by_ref.items() if w is not worker}
        self._kill(worker)
        if isinstance(exc, RayActorError) and exc.actor_init_failed:
            self._init_error = str(exc)
            self.target -= 1
            log.error("Ray pool: %s could not start (not replaced): %s; %d worker(s) left",
                      worker.name, exc, len(self._workers))
            return
        preempted = isinstance(exc, RayActorError) and exc.preempted
        if not preempted:
            self._deaths += 1
        if self._deaths > self.max_restarts:
            self.target -= 1
            log.warning("Ray pool: %s died (%s); restart budget (%d) spent, going on with %d "
                        "worker(s)", worker.name, _first_line(exc), self.max_restarts, self.target)
        else:
            log.warning("Ray pool: %s died (%s); replacing it (%d of %d restarts used)",
                        worker.name, _first_line(exc), self._deaths, self.max_restarts)
        self._last_grow = -math.inf  # look for room for the replacement at once

    def _kill(self, worker: _Worker) -> None:
        try:
            ray.kill(worker.handle, no_restart=True)
        except Exception as exc:  # noqa: BLE001  (already dead is fine)
            log.debug("kill %s: %s", worker.name, exc)

    def _lost_message(self) -> str:
        if self._init_error:
            return f"no Ray worker could start: {self._init_error}"
        return (f"every Ray worker is gone ({self._deaths} deaths, restart budget "
                f"{self.max_restarts}); {len(self._queue)} job(s) were not evaluated")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
