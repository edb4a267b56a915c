"""The records of `evaluations.jsonl`: one per finished evaluation, on any split."""

from __future__ import annotations

from eep.candidate import Candidate
from eep.result import FitnessResult

FULL_ID = "full"  # id and hash of the unpruned model's records


def evaluation_record(
    item_id: str,
    candidate: Candidate | None,
    result: FitnessResult,
    worker: str,
    content_hash: str | None = None,
) -> dict:
    """The record of one evaluation (`candidate` None: the full model)."""
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
        "fitness": result.fitness,
        "total": result.total,
        "rejected": result.rejected,
        "reject_below": result.reject_below,
        "bound": result.bound,
    }


def result_from_record(record: dict) -> FitnessResult:
    """The `FitnessResult` a record was written from (what a resumed strategy is told)."""
    return FitnessResult(
        score=float(record["score"]) if record["score"] is not None else float("nan"),
        metric=record.get("metric", ""),
        count=record.get("count", 0),
        seconds=record.get("seconds", 0.0),
        metrics=record.get("metrics") or {},
        split=record["split"],
        error=record.get("error"),
        fitness=record.get("fitness", "accuracy"),
        total=record.get("total", record.get("count", 0)),
        rejected=bool(record.get("rejected", False)),
        reject_below=record.get("reject_below"),
        bound=record.get("bound"),
    )
