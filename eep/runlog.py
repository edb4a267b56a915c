"""The run directory: everything a campaign learns, written before it is used.

    config.yaml              the resolved campaign config (every default filled in)
    evaluations.jsonl        one JSON object per finished evaluation, appended and flushed
    candidates/<id>.safetensors   every evaluated candidate
    checkpoint.safetensors   the strategy's state (tensors + JSON metadata), atomically replaced
    summary.json, best.safetensors, model/   the end of the campaign

A crash loses at most the evaluations in flight. The dashboard reads these files and never
writes them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eep.candidate import Candidate

CONFIG_FILE = "config.yaml"
EVALUATIONS_FILE = "evaluations.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
SUMMARY_FILE = "summary.json"
BEST_FILE = "best.safetensors"
CANDIDATES_DIR = "candidates"


class RunDirError(ValueError):
    """A run directory that cannot be created or resumed as asked."""


class RunLog:
    """Append-only access to one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | Path, config_yaml: str) -> RunLog:
        """A new run directory; refuses one that already holds evaluations."""
        log = cls(path)
        if (log.path / EVALUATIONS_FILE).exists() and (log.path / EVALUATIONS_FILE).stat().st_size:
            raise RunDirError(
                f"{log.path} already holds a campaign; resume it with --resume {log.path} "
                "or choose another --run-dir"
            )
        log.path.mkdir(parents=True, exist_ok=True)
        (log.path / CANDIDATES_DIR).mkdir(exist_ok=True)
        _atomic_write(log.path / CONFIG_FILE, config_yaml)
        (log.path / EVALUATIONS_FILE).touch()
        return log

    @classmethod
    def open(cls, path: str | Path) -> RunLog:
        """An existing run directory, its evaluations read (a torn last line is dropped)."""
        log = cls(path)
        if not (log.path / CONFIG_FILE).is_file():
            raise RunDirError(f"{log.path}: not a run directory (no {CONFIG_FILE})")
        log.records = list(log._read_records(repair=True))
        return log

    @property
    def config_yaml(self) -> str:
        """The resolved config the run was started with."""
        return (self.path / CONFIG_FILE).read_text()

    def _read_records(self, repair: bool = False) -> Iterator[dict]:
        path = self.path / EVALUATIONS_FILE
        if not path.exists():
            return
        raw = path.read_bytes()
        good = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # killed mid-write: the record never finished
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            good += len(line)
            yield record
        if repair and good < len(raw):
            with open(path, "r+b") as f:
                f.truncate(good)

    # ----------------------------------------------------------------------------- writing
    def append(self, record: dict[str, Any]) -> None:
        """Append one evaluation record and flush it to disk."""
        record = {**record, "time": record.get("time", time.time())}
        line = json.dumps(record, allow_nan=True) + "\n"
        with open(self.path / EVALUATIONS_FILE, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def save_candidate(self, candidate: Candidate) -> Path:
        """candidates/<id>.safetensors (once per id)."""
        path = self.path / CANDIDATES_DIR / f"{candidate.id}.safetensors"
        if not path.exists():
            candidate.save(path)
        return path

    def load_candidate(self, candidate_id: str) -> Candidate:
        """A candidate saved by `save_candidate`."""
        return Candidate.load(self.path / CANDIDATES_DIR / f"{candidate_id}.safetensors")

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with `state` (JSON types and tensors)."""
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split_tensors(state, tensors, "s")
        tmp = self.path / (CHECKPOINT_FILE + ".tmp")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"state": json.dumps(skeleton)},
        )
        os.replace(tmp, self.path / CHECKPOINT_FILE)

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The last complete checkpoint, or None."""
        path = self.path / CHECKPOINT_FILE
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return _join_tensors(skeleton, tensors)

    def write_json(self, name: str, data: Any) -> Path:
        """Atomically write a JSON file in the run directory."""
        path = self.path / name
        _atomic_write(path, json.dumps(data, indent=2, allow_nan=True) + "\n")
        return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """Replace every tensor in a nested structure by a reference; collect the tensors."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {k: _split_tensors(v, tensors, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value
