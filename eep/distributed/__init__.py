"""Evaluator pools: where candidates are scored (this process, or Ray actors)."""

from eep.distributed.pool import EvaluatorPool, InProcessPool, Job, WorkerSpec

__all__ = ["EvaluatorPool", "InProcessPool", "Job", "WorkerSpec"]
