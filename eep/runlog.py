"""The run directory: everything a campaign learns, written before it is used.

    config.yaml              the resolved campaign config (every default filled in)
    evaluations.jsonl        one JSON object per finished evaluation, appended and flushed
    candidates/<id>.safetensors   every evaluated candidate
    checkpoint.safetensors   the strategy's state (tensors + JSON metadata), atomically replaced
    summary.json, best.safetensors, model/   the end of the campaign

    .eep.lock                held (flock) by the one process writing the directory

A crash loses at most the evaluations in flight. The dashboard reads these files and never
writes them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eep.candidate import Candidate

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
EVALUATIONS_FILE = "evaluations.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"
SUMMARY_FILE = "summary.json"
BEST_FILE = "best.safetensors"
CANDIDATES_DIR = "candidates"
LOCK_FILE = ".eep.lock"


class RunDirError(ValueError):
    """A run directory that cannot be created or resumed as asked."""


class RunLog:
    """Append-only access to one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []
        self._lock_file: Any = None
        self.created_dir = False  # create() made the folder itself (so abandon() may remove it)

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | Path, config_yaml: str) -> RunLog:
        """A new run directory, locked; refuses a folder holding evaluations or unrelated files."""
        log_ = cls(path)
        path = log_.path
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path}: exists and is not a folder; choose another --run-dir")
        if path.is_dir() and not _is_run_dir(path) and any(p.name != LOCK_FILE for p in path.iterdir()):
            # Never write over somebody's folder: a run directory holds only what a campaign wrote.
            raise RunDirError(
                f"{path}: folder is not empty and not an eep run directory; "
                "choose a new or empty --run-dir"
            )
        log_.created_dir = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        log_.lock()
        try:
            evaluations = path / EVALUATIONS_FILE
            if evaluations.exists() and evaluations.stat().st_size:
                raise RunDirError(
                    f"{path} already holds a campaign; resume it with --resume {path} "
                    "or choose another --run-dir"
                )
            (path / CANDIDATES_DIR).mkdir(exist_ok=True)
            _atomic_write(path / CONFIG_FILE, config_yaml)
            evaluations.touch()
        except BaseException:
            log_.release()
            raise
        return log_

    @classmethod
    def open(cls, path: str | Path, lock: bool = False) -> RunLog:
        """An existing run directory, its evaluations read (a torn last line is dropped).

        With `lock` the directory is locked first (a writer); without it, nothing is repaired.
        """
        log_ = cls(path)
        if not log_.path.is_dir():
            raise RunDirError(f"{log_.path}: no such run directory")
        if not (log_.path / CONFIG_FILE).is_file():
            raise RunDirError(f"{log_.path}: not a run directory (no {CONFIG_FILE})")
        if lock:
            log_.lock()
        try:
            log_.records = list(log_._read_records(repair=lock))
        except BaseException:
            log_.release()
            raise
        return log_

    # ----------------------------------------------------------------------------- lock
    def lock(self) -> None:
        """Take the directory's exclusive lock or refuse; the OS drops it when the process dies."""
        path = self.path / LOCK_FILE
        f = open(path, "a+")  # noqa: SIM115  (held open for the campaign's life)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise RunDirError(
                f"{self.path} is in use by another eep process{f' (pid {holder})' if holder else ''}; "
                "wait for it to end, or choose another --run-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def abandon(self) -> None:
        """Undo a `create` that never recorded an evaluation (a campaign that failed to start)."""
        if self.records or (self.path / EVALUATIONS_FILE).exists() and (self.path / EVALUATIONS_FILE).stat().st_size:
            self.release()
            return
        # Only what a starting campaign writes: the config, the empty log, one-shot seeds.
        for path in [self.path / n for n in (CONFIG_FILE, EVALUATIONS_FILE, CHECKPOINT_FILE)] + sorted(
            self.path.glob("init_*.safetensors")
        ):
            path.unlink(missing_ok=True)
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        self.release()
        for sub in (self.path / CANDIDATES_DIR, self.path):
            if sub is self.path and not self.created_dir:
                break
            try:
                sub.rmdir()  # only when empty: never delete what someone else put there
            except OSError:
                break

    @property
    def config_yaml(self) -> str:
        """The resolved config the run was started with."""
        return (self.path / CONFIG_FILE).read_text()

    def _read_records(self, repair: bool = False) -> Iterator[dict]:
        """Every record; only a torn (newline-less) last line may be dropped, other damage is an error."""
        path = self.path / EVALUATIONS_FILE
        if not path.exists():
            return
        raw = path.read_bytes()
        good = 0
        for number, line in enumerate(raw.splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                break  # killed mid-write: the record never finished
            yield _parse_record(line, f"{path}, line {number}")
            good += len(line)
        if good < len(raw):
            log.warning("%s: dropping a torn last line (%d bytes)", path, len(raw) - good)
            if repair:
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
        """The last complete checkpoint, or None (missing, or unreadable: replay from the start)."""
        path = self.path / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                skeleton = json.loads((f.metadata() or {})["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            state = _join_tensors(skeleton, tensors)
            if not isinstance(state, dict):
                raise ValueError("state is not a mapping")
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            # The log holds every evaluation, so the checkpoint is only a shortcut.
            log.warning("%s is unreadable (%s); replaying the evaluation log from the start", path, exc)
            return None
        return state

    def write_json(self, name: str, data: Any) -> Path:
        """Atomically write a JSON file in the run directory."""
        path = self.path / name
        _atomic_write(path, json.dumps(data, indent=2, allow_nan=True) + "\n")
        return path


def _is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _parse_record(line: bytes, where: str) -> dict:
    """One evaluation record, checked for the fields a resume reads; errors name `where`."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: e.g. a line of 100,000 '['
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
        raise RunDirError(f"{where}: damaged record ({reason}); nothing was changed") from None
    if not isinstance(record, dict):
        raise RunDirError(f"{where}: damaged record (a JSON {type(record).__name__}, not an object)")
    for key in ("id", "split", "hash"):
        if not isinstance(record.get(key), str):
            raise RunDirError(f"{where}: damaged record ({key!r} missing or not a string)")
    score = record.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise RunDirError(f"{where}: damaged record (score {score!r} is not a number)")
    asked = record.get("asked")
    if record["split"] == "search" and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 0):
        raise RunDirError(f"{where}: damaged record (search record without a count 'asked')")
    return record


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
