"""The campaign driver: the one place that knows config, strategy, pool and run directory.

Search loop (steady state): while a worker is free, ask the strategy for one candidate and submit
it; when a result comes back, append it to the run directory, then tell the strategy. Asking one
at a time and recording with each result how many candidates had been asked makes the whole
ask/tell sequence reproducible from `evaluations.jsonl`; that is how `--resume` works: load the
last strategy checkpoint, replay the evaluations recorded after it (no model call), re-submit the
candidates that were in flight, and go on. A resumed campaign therefore makes the decisions an
uninterrupted one would have made.

End (`eep.finale`): each list of finalists the strategy's registry entry declares is re-scored on
`dev`, the best on dev is chosen, and the full model, the chosen candidate(s) and random pruning
baselines are scored on `test`; `summary.json` (`eep.summary`) reports them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from eep.candidate import Candidate
from eep.config import CampaignConfig, ConfigError, config_from_dict, resumed_config
from eep.distributed.pool import EvaluatorPool, InProcessPool, Job, WorkerSpec
from eep.finale import SplitScorer, random_baselines, run_finale
from eep.forced import FORCED_METRICS
from eep.metrics import CampaignMetrics
from eep.models.families import detect_family, model_shape
from eep.models.loading import load_config as load_model_config
from eep.oneshot import seed_candidates
from eep.records import evaluation_record, result_from_record
from eep.runlog import BEST_FILE, SUMMARY_FILE, RunLog
from eep.search import BaseStrategy, build_strategy, registry
from eep.summary import format_summary
from eep.tasks.scorers import primary_metric, search_metric

log = logging.getLogger(__name__)
POLISH_KEY = "polish"  # summary row of the polished candidate
POLISH_FILE = "polish.json"  # what the polishing job reported (read back on resume)


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
    examples: int = 0  # search-split examples scored (early rejection scores fewer)
    rejected: int = 0
    started: float = field(default_factory=time.time)
    running: bool = True  # False once the search loop has exited: the clock stops

    def seconds(self) -> float:
        return self.elapsed + time.time() - self.started if self.running else self.elapsed

    def stop(self) -> None:
        """Stop the search clock (the end phase and polishing are not search time)."""
        self.elapsed, self.running = self.seconds(), False


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
        self._fresh = not resume
        # The run directory is locked from here until run() ends (or the process dies).
        if resume:
            self.runlog = RunLog.open(run_dir or config.run_dir, lock=True)
            try:
                origin = str(self.runlog.path / "config.yaml")
                try:
                    stored_data = yaml.safe_load(self.runlog.config_yaml)
                except (yaml.YAMLError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"{origin}: not readable YAML ({exc})") from None
                if not isinstance(stored_data, dict):
                    raise ConfigError(f"{origin}: expected a mapping, got {type(stored_data).__name__}")
                stored = config_from_dict(stored_data, origin=origin)
                self.config = resumed_config(stored, config, origin)
            except BaseException:
                self.runlog.release()
                raise
        else:
            self.config = config
            self.runlog = RunLog.create(run_dir or config.run_dir, config.to_yaml())
        try:
            self._start(pool)
        except BaseException:
            # A campaign that failed to start leaves no empty run directory behind.
            if resume:
                self.runlog.release()
            else:
                self.runlog.abandon()
            raise

    def _start(self, pool: EvaluatorPool | None) -> None:
        """Model shape, strategy (with its seeds) and replay of the run directory."""
        model_config = load_model_config(self.config.model, self.config.trust_remote_code)
        self.shape = model_shape(model_config)
        self.entry = registry.entry_for(self.config.strategy)
        self.budget = self.config.strategy.keep_budget(self.shape.num_moe_layers, self.shape.num_experts)
        refusal = self.budget.routing_refusal(detect_family(model_config).routing(model_config))
        if refusal is not None:
            raise ConfigError(f"{self.config.model}: {refusal}")
        self.strategy: BaseStrategy = build_strategy(
            self.config.strategy,
            self.shape.num_moe_layers,
            self.shape.num_experts,
            seed=self.config.seed,
            model_id=self.config.model,
            # Files, or one-shot method names run on the task's search split (eep.oneshot).
            init_from=seed_candidates(
                self.config.init_from, self.config.model, self.config.task, self.budget,
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
        # Derived from the log (not the checkpoint), so they hold after any crash.
        self.progress.examples = sum(int(r.get("count") or 0) for r in search)
        self.progress.rejected = sum(bool(r.get("rejected")) for r in search)
        # Records written after the checkpoint (a crash skips the exit checkpoint): replayed here.
        self.replayed: int = 0
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
            self.strategy.tell(candidate, result_from_record(record))
            self.progress.search_records += 1
            self.replayed += 1
            self.progress.elapsed = max(self.progress.elapsed, record.get("elapsed", 0.0))
        if search:
            log.info(
                "resumed %s: %d search evaluations, %d replayed after the checkpoint, %d in flight re-submitted",
                self.runlog.path, len(search), self.replayed, len(self.strategy.pending()),
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
        if budget.max_examples is not None and self.progress.examples >= budget.max_examples:
            return False
        return not self.strategy.done

    def _job(self, candidate: Candidate) -> Job:
        """A search job, with early rejection's threshold when the campaign asks for it."""
        threshold = None
        if self.config.fitness.early_rejection is not None:
            # A plug-in strategy without the method gets every candidate scored in full.
            rule = getattr(self.strategy, "rejection_threshold", None)
            threshold = rule(candidate, self.config.final.dev_top) if rule is not None else None
        return Job(candidate, "search", threshold)

    def search(self) -> None:
        """Run the search loop until the strategy or the budget ends it."""
        self.progress.started, self.progress.running = time.time(), True
        pool = self.pool
        for candidate in self.strategy.pending():  # in flight when the last run stopped
            pool.submit(self._job(candidate))
        bar = self._bar()
        try:
            while True:
                while pool.idle() > 0 and self._may_ask():
                    asked = self.strategy.ask(1)
                    if not asked:
                        break
                    self.progress.asked += 1
                    pool.submit(self._job(asked[0]))
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
            self.progress.stop()
            self._checkpoint()

    def _record_search(self, job: Job) -> None:
        candidate, result = job.candidate, job.result
        assert candidate is not None and result is not None
        self.runlog.save_candidate(candidate)
        record = evaluation_record(candidate.id, candidate, result, job.worker) | {
            "asked": self.progress.asked,
            "elapsed": self.progress.seconds(),
        }
        self.runlog.append(record)
        self.metrics.observe(record, workers=self.pool.size)
        self.strategy.tell(candidate, result)
        self.progress.search_records += 1
        self.progress.examples += result.count
        self.progress.rejected += result.rejected
        if self.progress.search_records % self.config.output.checkpoint_every == 0:
            self._checkpoint()

    def _expected_evaluations(self) -> int | None:
        total = self.entry.expected_evaluations(self.config.strategy)
        cap = self.config.budget.max_evaluations
        return min(x for x in (total, cap) if x is not None) if (total or cap) else None

    def _status(self) -> str:
        best = self.strategy.best(1)
        phase = self.strategy.phase
        minutes = max(self.progress.seconds(), 1e-9) / 60
        rate = self.progress.search_records / minutes
        best_text = f"{best[0][1]:.3f}" if best else "-"
        status = f"best {best_text} | {phase} | {rate:.0f} eval/min"
        if self.config.fitness.early_rejection is not None or self.config.budget.max_examples:
            status += f" | {self.progress.examples} examples, {self.progress.rejected} rejected"
        return status

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
    def finish(self) -> CampaignResult:
        """Dev re-ranking and test scores (eep.finale), summary.json, export of the choice."""
        cfg = self.config
        scorer = SplitScorer(self.runlog, lambda: self.pool, self.metrics)
        search_records = [r for r in self.runlog.records if r["split"] == "search"]
        baselines = random_baselines(
            cfg.final.random_baselines, self.budget, cfg.top_k, cfg.seed, cfg.model,
        )
        finale = run_finale(
            self.strategy, self.entry, scorer, cfg.final.dev_top, search_records, baselines
        )
        polish_seconds = 0.0
        if cfg.polish is not None and finale.chosen is not None:
            polished, row = self._polish(finale.chosen, finale.methods[finale.chosen_key], scorer)
            finale.methods[POLISH_KEY] = row
            polish_seconds = float(row.get("seconds", 0.0))
            if polished is not None:
                finale.chosen, finale.chosen_key = polished, POLISH_KEY
        summary = {
            "name": cfg.name,
            "model": cfg.model,
            "task": cfg.task.name,
            "keep": cfg.keep if self.budget.is_uniform else round(self.budget.mean, 3),
            **({} if self.budget.is_uniform else {"keep_budget": self.budget.describe()}),
            "num_experts": self.shape.num_experts,
            "top_k": cfg.top_k or self.shape.top_k,
            "strategy": cfg.strategy.kind,
            "metric": primary_metric(cfg.task),
            "search_metric": FORCED_METRICS.get(cfg.fitness.kind) or search_metric(cfg.task),
            "dev_metric": search_metric(cfg.task),
            "fitness": cfg.fitness.kind,
            "search_evaluations": self.progress.search_records,
            "search_examples": self.progress.examples,
            "search_rejected": self.progress.rejected,
            "search_seconds": self.progress.seconds(),
            **({"polish_seconds": polish_seconds} if cfg.polish is not None else {}),
            "chosen": finale.chosen_key,
            "methods": finale.methods,
        }
        result = CampaignResult(run_dir=self.runlog.path, summary=summary)
        if finale.chosen is not None:
            finale.chosen.save(self.runlog.path / BEST_FILE)
            result.best = finale.chosen
            if cfg.output.export:
                from eep.export import export_model  # noqa: PLC0415  (transformers only when exporting)

                report = export_model(
                    cfg.model, finale.chosen, self.runlog.path / "model",
                    trust_remote_code=cfg.trust_remote_code,
                    campaign=cfg, summary=summary,  # recipe and model card: config, test table
                )
                result.export_dir = report.out_dir
                summary["export_dir"] = str(report.out_dir)
                summary["export_stock"] = report.stock
        self.runlog.write_json(SUMMARY_FILE, summary)
        result.table = format_summary(summary)
        return result

    def _polish(self, chosen: Candidate, chosen_row: dict, scorer: SplitScorer) -> tuple[Candidate | None, dict]:
        """Polish the dev winner on the search split (eep.polish); (the polished one if it beats
        the winner on dev, else None; its summary row). A finished polish is read back on resume."""
        from eep.polish import keep_polished  # noqa: PLC0415  (torch only when polishing)

        settings = self.config.polish
        assert settings is not None
        label = f"{chosen_row.get('label', 'chosen')} + polish"
        row: dict = {"label": label, "row": "search", "evaluations": 0}
        done_path = self.runlog.path / POLISH_FILE
        done = json.loads(done_path.read_text()) if done_path.is_file() else None
        if done is not None and done.get("source_hash") == chosen.content_hash():
            polished = self.runlog.load_candidate(done["id"])
        else:
            job = Job(chosen, "search", polish=settings.model_dump(mode="json"))
            pool = self.pool
            pool.submit(job)
            while pool.in_flight:
                pool.wait()
            assert job.result is not None
            if job.result.failed or job.output is None:
                log.warning("polishing %s failed: %s; keeping it unpolished", chosen.id, job.result.error)
                return None, {**row, "note": f"polishing failed: {job.result.error}"}
            polished = job.output.with_meta(id=f"{chosen.id}-polished")
            self.runlog.save_candidate(polished)
            metrics = job.result.metrics
            done = {"source_hash": chosen.content_hash(), "id": polished.id,
                    "kl_before": -metrics["neg_kl_before"], "kl_after": -job.result.score,
                    "steps": int(metrics["steps"]), "seconds": job.result.seconds, "worker": job.worker,
                    "settings": settings.model_dump(mode="json")}
            self.runlog.write_json(POLISH_FILE, done)
        dev = scorer.score([(polished.id, polished)], "dev")[polished.id]
        test = scorer.score([(polished.id, polished)], "test")[polished.id]
        row.update(id=polished.id, dev=dev, test=test, seconds=done.get("seconds", 0.0),
                   kl_before=done.get("kl_before"), kl_after=done.get("kl_after"), steps=done.get("steps"))
        lowered = polished.content_hash() != chosen.content_hash() and done["kl_after"] < done["kl_before"]
        beats = keep_polished(chosen_row.get("dev", float("-inf")), dev, lowered)
        if not lowered:
            row["note"] = "not kept: polishing did not lower the KL"
        elif not beats:
            row["note"] = "not kept: below the unpolished candidate on dev"
        return (polished if beats else None), row

    def run(self) -> CampaignResult:
        """Search, then finish; the pool is closed at the end."""
        try:
            self.search()
            return self.finish()
        finally:
            if self._pool is not None:
                self._pool.close()
            if self._fresh and not self.runlog.records:
                self.runlog.abandon()  # failed before its first evaluation: leave no empty run behind
            else:
                self.runlog.release()


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
        fitness=config.fitness.kind,
        kl_top=config.fitness.kl_top,
        rejection=(
            (config.fitness.early_rejection.confidence, config.fitness.early_rejection.slice)
            if config.fitness.early_rejection is not None else None
        ),
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
