"""The campaign driver: the one place that knows config, strategy, pool and run directory.

Search loop (steady state): while a worker is free, ask the strategy for one candidate and submit
it; when a result comes back, append it to the run directory, then tell the strategy. Asking one
at a time and recording with each result how many candidates had been asked makes the whole
ask/tell sequence reproducible from `evaluations.jsonl`; that is how `--resume` works: load the
last strategy checkpoint, replay the evaluations recorded after it (no model call), re-submit the
candidates that were in flight, and go on. A resumed campaign therefore makes the decisions an
uninterrupted one would have made.

End: the top candidates by search score are re-scored on `dev`, the best on dev is chosen, and the
full model, the chosen candidate(s) and random pruning baselines are scored on `test`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from eep.candidate import Candidate
from eep.config import CampaignConfig, config_from_dict
from eep.distributed.pool import EvaluatorPool, InProcessPool, Job, WorkerSpec
from eep.metrics import CampaignMetrics
from eep.models.families import model_shape
from eep.models.loading import load_config as load_model_config
from eep.oneshot import seed_candidates
from eep.result import FitnessResult
from eep.runlog import BEST_FILE, SUMMARY_FILE, RunLog
from eep.search import BaseStrategy, build_strategy
from eep.tasks.scorers import primary_metric, search_metric

log = logging.getLogger(__name__)
FULL_ID = "full"


@dataclass
class CampaignResult:
    """What a finished campaign produced."""

    run_dir: Path
    summary: dict
    best: Candidate | None = None
    export_dir: Path | None = None
    table: str = ""


@dataclass
class _Progress:
    """The search-time counters that must survive a resume."""

    asked: int = 0
    search_records: int = 0
    elapsed: float = 0.0
    started: float = field(default_factory=time.time)

    def seconds(self) -> float:
        return self.elapsed + time.time() - self.started


class Campaign:
    """One campaign run over a run directory."""

    def __init__(
        self,
        config: CampaignConfig,
        run_dir: str | Path | None = None,
        resume: bool = False,
        quiet: bool = False,
        pool: EvaluatorPool | None = None,
    ) -> None:
        self.quiet = quiet
        if resume:
            self.runlog = RunLog.open(run_dir or config.run_dir)
            stored = config_from_dict(
                yaml.safe_load(self.runlog.config_yaml),
                origin=str(self.runlog.path / "config.yaml"),
            )
            if stored != config:
                log.warning("resuming with the run directory's own config.yaml (it differs from the one given)")
            self.config = stored
        else:
            self.config = config
            self.runlog = RunLog.create(run_dir or config.run_dir, config.to_yaml())
        self.shape = model_shape(load_model_config(self.config.model, self.config.trust_remote_code))
        self.strategy: BaseStrategy = build_strategy(
            self.config.strategy,
            self.shape.num_moe_layers,
            self.shape.num_experts,
            seed=self.config.seed,
            model_id=self.config.model,
            # Files, or one-shot method names run on the task's search split (eep.oneshot).
            init_from=seed_candidates(
                self.config.init_from, self.config.model, self.config.task, self.config.keep,
                self.runlog.path, top_k=self.config.top_k, seed=self.config.seed,
                device=self.config.evaluation.device, dtype=self.config.evaluation.dtype,
                trust_remote_code=self.config.trust_remote_code,
            ),
        )
        self.progress = _Progress()
        self.metrics = CampaignMetrics(self.config.name)
        self._pool = pool
        self._replay()

    # ----------------------------------------------------------------------------- pool
    @property
    def pool(self) -> EvaluatorPool:
        """The evaluator pool, built on first use (loading models is the slow part)."""
        if self._pool is None:
            self._pool = make_pool(self.config)
        return self._pool

    # ----------------------------------------------------------------------------- resume
    def _replay(self) -> None:
        """Bring the strategy to where the run directory says it was."""
        checkpoint = self.runlog.read_checkpoint()
        if checkpoint is not None:
            self.strategy.load_state_dict(checkpoint["strategy"])
            self.progress = _Progress(
                asked=int(checkpoint["asked"]),
                search_records=int(checkpoint["search_records"]),
                elapsed=float(checkpoint["elapsed"]),
            )
        search = [r for r in self.runlog.records if r["split"] == "search"]
        for record in search[self.progress.search_records :]:
            while self.progress.asked < record["asked"]:
                if not self.strategy.ask(1):
                    raise RuntimeError(
                        f"{self.runlog.path}: replay diverged: the strategy asked for nothing "
                        f"before {record['id']}; was the run directory written by another config?"
                    )
                self.progress.asked += 1
            candidate = self._pending(record["id"])
            if candidate.content_hash() != record["hash"]:
                raise RuntimeError(
                    f"{self.runlog.path}: replay diverged at {record['id']}: hash "
                    f"{candidate.content_hash()} != recorded {record['hash']}"
                )
            self.strategy.tell(candidate, _result_from_record(record))
            self.progress.search_records += 1
            self.progress.elapsed = max(self.progress.elapsed, record.get("elapsed", 0.0))
        if search:
            log.info(
                "resumed %s: %d search evaluations replayed, %d in flight re-submitted",
                self.runlog.path, len(search), len(self.strategy.pending()),
            )

    def _pending(self, candidate_id: str) -> Candidate:
        for candidate in self.strategy.pending():
            if candidate.id == candidate_id:
                return candidate
        raise RuntimeError(
            f"{self.runlog.path}: replay diverged: {candidate_id} is not a pending candidate"
        )

    def _checkpoint(self) -> None:
        self.runlog.write_checkpoint(
            {
                "strategy": self.strategy.state_dict(),
                "asked": self.progress.asked,
                "search_records": self.progress.search_records,
                "elapsed": self.progress.seconds(),
            }
        )

    # ----------------------------------------------------------------------------- search
    def _may_ask(self) -> bool:
        budget = self.config.budget
        if budget.max_evaluations is not None and self.progress.asked >= budget.max_evaluations:
            return False
        if budget.max_seconds is not None and self.progress.seconds() >= budget.max_seconds:
            return False
        return not self.strategy.done

    def search(self) -> None:
        """Run the search loop until the strategy or the budget ends it."""
        self.progress.started = time.time()
        pool = self.pool
        for candidate in self.strategy.pending():  # in flight when the last run stopped
            pool.submit(Job(candidate, "search"))
        bar = self._bar()
        try:
            while True:
                while pool.idle() > 0 and self._may_ask():
                    asked = self.strategy.ask(1)
                    if not asked:
                        break
                    self.progress.asked += 1
                    pool.submit(Job(asked[0], "search"))
                if pool.in_flight == 0:
                    break
                for job in pool.wait():
                    self._record_search(job)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(self._status(), refresh=False)
        finally:
            if bar is not None:
                bar.close()
            self._checkpoint()

    def _record_search(self, job: Job) -> None:
        candidate, result = job.candidate, job.result
        assert candidate is not None and result is not None
        self.runlog.save_candidate(candidate)
        record = _record(candidate.id, candidate, result, job.worker) | {
            "asked": self.progress.asked,
            "elapsed": self.progress.seconds(),
        }
        self.runlog.append(record)
        self.metrics.observe(record, workers=self.pool.size)
        self.strategy.tell(candidate, result)
        self.progress.search_records += 1
        if self.progress.search_records % self.config.output.checkpoint_every == 0:
            self._checkpoint()

    def _expected_evaluations(self) -> int | None:
        settings = self.config.strategy
        total = getattr(settings, "total_iter", None)
        total = total + 1 if total is not None else getattr(settings, "budget", None)
        cap = self.config.budget.max_evaluations
        return min(x for x in (total, cap) if x is not None) if (total or cap) else None

    def _status(self) -> str:
        best = self.strategy.best(1)
        phase = getattr(self.strategy, "phase", "")
        minutes = max(self.progress.seconds(), 1e-9) / 60
        rate = self.progress.search_records / minutes
        best_text = f"{best[0][1]:.3f}" if best else "-"
        return f"best {best_text} | {phase} | {rate:.0f} eval/min"

    def _bar(self):
        if self.quiet:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self._expected_evaluations(),
            initial=self.progress.search_records,
            desc=self.config.name,
            unit="eval",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    # ----------------------------------------------------------------------------- final
    def _known(self, split: str) -> dict[str, dict]:
        return {r["hash"]: r for r in self.runlog.records if r["split"] == split and not r.get("error")}

    def _score_all(self, items: list[tuple[str, Candidate | None]], split: str) -> dict[str, float]:
        """Scores on `split` by id, reusing recorded ones (resume), scoring the rest in parallel."""
        known = self._known(split)
        scores: dict[str, float] = {}
        todo = []
        for item_id, candidate in items:
            content_hash = candidate.content_hash() if candidate is not None else FULL_ID
            if content_hash in known:
                scores[item_id] = known[content_hash]["score"]
            else:
                todo.append((item_id, candidate, content_hash))
        by_job = {}
        for item_id, candidate, content_hash in todo:
            job = Job(candidate, split)
            by_job[id(job)] = (item_id, candidate, content_hash)
            self.pool.submit(job)
        while self.pool.in_flight:
            for job in self.pool.wait():
                item_id, candidate, content_hash = by_job[id(job)]
                if candidate is not None:
                    self.runlog.save_candidate(candidate)
                record = _record(item_id, candidate, job.result, job.worker, content_hash)
                self.runlog.append(record)
                self.metrics.observe(record, workers=self.pool.size)
                scores[item_id] = job.result.score
        return scores

    def _choose_on_dev(self, ranked: list[tuple[Candidate, float]]) -> tuple[Candidate, float, float]:
        """The best of `ranked` on dev (ties: the better search score, i.e. the earlier one)."""
        dev = self._score_all([(c.id, c) for c, _ in ranked], "dev")
        best_candidate, best_search = ranked[0]
        best_dev = -math.inf
        for candidate, search_score in ranked:
            score = dev[candidate.id]
            if not math.isnan(score) and score > best_dev:
                best_candidate, best_search, best_dev = candidate, search_score, score
        return best_candidate, best_search, best_dev

    def finish(self) -> CampaignResult:
        """Dev re-ranking, test report, summary, export."""
        cfg = self.config
        kind = cfg.strategy.kind
        dev_top = getattr(cfg.strategy, "dev_top", None) or cfg.final.dev_top
        methods: dict[str, dict] = {}
        chosen: dict[str, Candidate] = {}
        search_count = self.progress.search_records

        name = {"eep": "eep", "random": "random_search", "coordinate_descent": "coordinate_descent"}[kind]
        prune_only = getattr(self.strategy, "prune_only_best", None)
        prune_only_choice: list[tuple[Candidate, float]] = []
        if prune_only is not None:
            ranked = prune_only(dev_top)
            if ranked:
                best, search_score, dev_score = self._choose_on_dev(ranked)
                chosen["eep_prune_only"] = best
                prune_only_choice = [(best, search_score)]
                pruning_evals = sum(
                    1 for r in self.runlog.records if r["split"] == "search" and r.get("phase") in ("init", "prune")
                )
                methods["eep_prune_only"] = {
                    "id": best.id, "search": search_score, "dev": dev_score, "evaluations": pruning_evals,
                }
        ranked = self.strategy.best(dev_top)
        # The pruning phase's dev winner stays in the running: after the merging phase the top by
        # search score can be all merged candidates that overfit the search split.
        ranked += [c for c in prune_only_choice if c[0].id not in {r[0].id for r in ranked}]
        if ranked:
            best, search_score, dev_score = self._choose_on_dev(ranked)
            chosen[name] = best
            methods[name] = {"id": best.id, "search": search_score, "dev": dev_score, "evaluations": search_count}
        else:
            methods[name] = {
                "evaluations": search_count,
                "note": "no complete candidate within the budget (every layer pruned)",
            }
            log.warning("%s: %s", name, methods[name]["note"])

        generator = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        baselines = [
            Candidate.random_pruning(
                self.shape.num_moe_layers, self.shape.num_experts, cfg.keep, generator,
                top_k=cfg.top_k, id=f"random-baseline-{i:02d}", phase="baseline", model_id=cfg.model,
            )
            for i in range(cfg.final.random_baselines)
        ]
        test_items: list[tuple[str, Candidate | None]] = [(FULL_ID, None)]
        test_items += [(c.id, c) for c in chosen.values()]
        test_items += [(c.id, c) for c in baselines]
        test = self._score_all(test_items, "test")

        methods["full"] = {"test": test[FULL_ID], "evaluations": 0}
        for method, candidate in chosen.items():
            methods[method]["test"] = test[candidate.id]
        if baselines:
            scores = [test[c.id] for c in baselines]
            methods["random"] = {
                "test": sum(scores) / len(scores), "scores": scores, "evaluations": len(baselines),
            }
        summary = {
            "name": cfg.name,
            "model": cfg.model,
            "task": cfg.task.name,
            "keep": cfg.keep,
            "num_experts": self.shape.num_experts,
            "top_k": cfg.top_k or self.shape.top_k,
            "strategy": kind,
            "metric": primary_metric(cfg.task),
            "search_metric": search_metric(cfg.task),
            "search_evaluations": search_count,
            "search_seconds": self.progress.seconds(),
            "methods": methods,
        }
        result = CampaignResult(run_dir=self.runlog.path, summary=summary)
        final = chosen.get(name)
        if final is not None:
            final.save(self.runlog.path / BEST_FILE)
            result.best = final
            if cfg.output.export:
                from eep.export import export_model

                report = export_model(
                    cfg.model, final, self.runlog.path / "model", trust_remote_code=cfg.trust_remote_code
                )
                result.export_dir = report.out_dir
                summary["export_dir"] = str(report.out_dir)
                summary["export_stock"] = report.stock
        self.runlog.write_json(SUMMARY_FILE, summary)
        result.table = format_summary(summary)
        return result

    def run(self) -> CampaignResult:
        """Search, then finish; the pool is closed at the end."""
        try:
            self.search()
            return self.finish()
        finally:
            if self._pool is not None:
                self._pool.close()


def make_pool(config: CampaignConfig) -> EvaluatorPool:
    """In-process for `workers: 0`, Ray actors otherwise."""
    spec = WorkerSpec(
        model=config.model,
        task=config.task.model_dump(mode="json"),
        device=config.evaluation.device,
        dtype=config.evaluation.dtype,
        batch_size=config.evaluation.batch_size,
        originals_on_cpu=config.evaluation.originals_on_cpu,
        threads=config.evaluation.threads,
        trust_remote_code=config.trust_remote_code,
        splits=("search", "dev", "test"),
    )
    if config.workers == 0 and config.ray_address is None:
        return InProcessPool(spec)
    from eep.distributed.ray_pool import RayPool  # noqa: PLC0415  (Ray only when asked for)

    return RayPool(spec, config)


def run_campaign(
    config: CampaignConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    pool: EvaluatorPool | None = None,
) -> CampaignResult:
    """Run (or resume) a campaign to its end."""
    return Campaign(config, run_dir=run_dir, resume=resume, quiet=quiet, pool=pool).run()


def _record(
    item_id: str,
    candidate: Candidate | None,
    result: FitnessResult,
    worker: str,
    content_hash: str | None = None,
) -> dict:
    return {
        "id": item_id,
        "hash": content_hash or (candidate.content_hash() if candidate is not None else FULL_ID),
        "parents": list(candidate.parents) if candidate is not None else [],
        "phase": candidate.phase if candidate is not None else "full",
        "split": result.split,
        "score": result.score,
        "metric": result.metric,
        "metrics": result.metrics,
        "count": result.count,
        "seconds": result.seconds,
        "tokens": result.tokens,
        "worker": worker,
        "error": result.error,
    }


def _result_from_record(record: dict) -> FitnessResult:
    return FitnessResult(
        score=float(record["score"]) if record["score"] is not None else float("nan"),
        metric=record.get("metric", ""),
        count=record.get("count", 0),
        seconds=record.get("seconds", 0.0),
        metrics=record.get("metrics") or {},
        split=record["split"],
        error=record.get("error"),
    )


def format_summary(summary: dict) -> str:
    """The summary table (test split) as aligned text."""
    order = ["full", "random", "random_search", "coordinate_descent", "eep_prune_only", "eep"]
    labels = {
        "full": "full model",
        "random": "random pruning (mean)",
        "random_search": "random search",
        "coordinate_descent": "coordinate descent",
        "eep_prune_only": "EEP prune-only",
        "eep": "EEP prune+merge",
    }
    methods = summary["methods"]
    lines = [
        f"{summary['task']}: keep {summary['keep']} of {summary['num_experts']} experts, "
        f"top-{summary['top_k']}, test split",
    ]
    metric, searched = summary.get("metric"), summary.get("search_metric")
    if metric and searched and metric != searched:
        lines.append(f"test in {metric}; dev and search in {searched}")
    lines.append(f"{'method':<24} {'test':>7} {'dev':>7} {'search':>7} {'evals':>6}")
    for key in order:
        if key not in methods:
            continue
        m = methods[key]
        cells = [_fmt(m.get("test")), _fmt(m.get("dev")), _fmt(m.get("search"))]
        lines.append(f"{labels[key]:<24} {cells[0]:>7} {cells[1]:>7} {cells[2]:>7} {m.get('evaluations', 0):>6}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
