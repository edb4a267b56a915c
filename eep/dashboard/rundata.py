"""Read-only view of one run directory, live or finished, for the dashboard and the report.

`evaluations.jsonl` is read incrementally: each refresh parses only the complete lines appended
since the last one, so polling a campaign with 100,000 evaluations stays cheap. Nothing here
ever writes, truncates or locks a run file (`RunLog.open` repairs a torn last line; this view
just stops before it and waits for the campaign to finish writing it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eep.runlog import CANDIDATES_DIR, CONFIG_FILE, EVALUATIONS_FILE, SUMMARY_FILE
from eep.summary import method_rows

log = logging.getLogger(__name__)

# The columns the page plots; one list per field, appended as records arrive.
COLUMNS = ("id", "split", "phase", "score", "elapsed", "worker", "seconds", "failed")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_RECORDS = 5000  # records per /evaluations answer; `next` says where the next page starts
_RATE_WINDOW = 50  # search records the recent rate (and so the ETA) is measured over


def finite(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, NaN or infinite (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number(value: Any) -> float | None:
    """`finite` with a fast path for the plain floats a run log holds (called 4x per record)."""
    if value.__class__ is float:
        return value if value - value == 0.0 else None  # NaN and inf give NaN
    return finite(value)


def _safe_records(records: list[dict]) -> list[dict]:
    """`json_safe` of each record; one nested too deeply to copy becomes a stub, not an error."""
    try:
        return json_safe(records)
    except RecursionError:
        out = []
        for record in records:
            try:
                out.append(json_safe(record))
            except RecursionError:
                out.append({"id": str(record.get("id", "")), "damaged": "nested too deeply"})
        return out


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def json_safe(value: Any) -> Any:
    """A copy of `value` with NaN/inf floats turned into None, so browsers can parse it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class _Worker:
    """Running totals of one worker's evaluations."""

    count: int = 0
    failed: int = 0
    busy: float = 0.0
    last: float = 0.0


@dataclass
class _Totals:
    """Aggregates updated record by record, so a refresh costs only the new lines."""

    splits: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    search: int = 0
    best_index: int | None = None  # index into the search records
    best_score: float = -math.inf
    best_id: str = ""
    best_steps: list[list[float | None]] = field(default_factory=list)  # [index, elapsed, score]
    phase_boundary: int | None = None  # search index of the first "merge" record
    phase: str = ""
    workers: dict[str, _Worker] = field(default_factory=dict)
    recent: deque = field(default_factory=lambda: deque(maxlen=_RATE_WINDOW))
    first_time: float | None = None
    last_time: float | None = None
    last_elapsed: float = 0.0
    examples: int = 0  # search-split examples scored (early rejection scores fewer)
    rejected: int = 0
    held_out: dict[str, dict[str, dict]] = field(default_factory=dict)  # split -> id -> record


class RunView:
    """One run directory as the dashboard sees it; safe to share between server threads."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self._lock = threading.Lock()
        self._reset()
        self._config: dict | None = None
        self._config_mtime = -1.0
        self._candidates: dict[str, tuple[float, dict]] = {}

    def _reset(self) -> None:
        self._offset = 0
        self._inode: int | None = None
        self._records: list[dict] = []
        self._columns: dict[str, list] = {c: [] for c in COLUMNS}
        self._search_index: dict[str, int] = {}  # candidate id -> search index
        self._totals = _Totals()
        self._skipped = 0
        self._columns_cache: tuple[int, bytes] | None = None

    # ----------------------------------------------------------------------------- reading
    def refresh(self) -> None:
        """Parse the complete lines appended to evaluations.jsonl since the last refresh."""
        path = self.path / EVALUATIONS_FILE
        with self._lock:
            try:
                stat = path.stat()
            except FileNotFoundError:
                if self._records:
                    self._reset()
                return
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._reset()  # a new campaign in the same directory
                self._inode = stat.st_ino
            if stat.st_size == self._offset:
                return
            with open(path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(stat.st_size - self._offset)
            end = chunk.rfind(b"\n") + 1  # a torn last line waits for its newline
            for record in self._parse(chunk[:end]):
                try:
                    self._add(record)
                except (RecursionError, TypeError, ValueError):
                    # Fields are converted before anything is updated, so a bad record leaves no trace.
                    self._skipped += 1
            self._offset += end

    def _parse(self, chunk: bytes) -> list[dict]:
        """The records in complete lines; one JSON array parse is ~2x faster than line by line."""
        lines = [line for line in chunk.decode("utf-8", errors="replace").split("\n") if line.strip()]
        try:
            records = json.loads("[" + ",".join(lines) + "]")
        except (ValueError, RecursionError):  # RecursionError: e.g. a line of 100,000 '['
            records = []
            for line in lines:  # a damaged line: keep the others
                try:
                    records.append(json.loads(line))
                except (ValueError, RecursionError):
                    self._skipped += 1
        good = [r for r in records if isinstance(r, dict)]
        self._skipped += len(records) - len(good)
        return good

    def _add(self, record: dict) -> None:
        t = self._totals
        split = str(record.get("split", "search"))
        score = _number(record.get("score"))
        failed = bool(record.get("error")) or score is None
        when = _number(record.get("time"))
        seconds = _number(record.get("seconds")) or 0.0
        elapsed = _number(record.get("elapsed"))
        phase = str(record.get("phase") or "")
        worker = str(record.get("worker") or "?")
        record_id = str(record.get("id", ""))

        t.splits[split] = t.splits.get(split, 0) + 1
        t.failed += failed
        if when is not None:
            start = when - seconds
            t.first_time = start if t.first_time is None else min(t.first_time, start)
            t.last_time = when if t.last_time is None else max(t.last_time, when)
        if elapsed is None and when is not None and t.first_time is not None:
            elapsed = when - t.first_time  # records written before `elapsed` existed
        w = t.workers.setdefault(worker, _Worker())
        w.count += 1
        w.failed += failed
        w.busy += seconds
        if when is not None:
            w.last = max(w.last, when)

        if split == "search":
            index = t.search
            t.search += 1
            self._search_index.setdefault(record_id, index)
            t.phase = phase or t.phase
            if phase == "merge" and t.phase_boundary is None:
                t.phase_boundary = index
            if elapsed is not None:
                t.last_elapsed = max(t.last_elapsed, elapsed)
            if when is not None:
                t.recent.append(when)
            rejected = bool(record.get("rejected"))
            t.rejected += rejected
            t.examples += int(_number(record.get("count")) or 0)
            # A rejected candidate's partial score is not a result: it is never the best.
            if score is not None and not rejected and score > t.best_score:
                t.best_score, t.best_index, t.best_id = score, index, record_id
                t.best_steps.append([index, elapsed, score])
        else:
            t.held_out.setdefault(split, {})[record_id] = record

        cols = self._columns
        cols["id"].append(record_id)
        cols["split"].append(split)
        cols["phase"].append(phase)
        cols["score"].append(score)
        cols["elapsed"].append(elapsed)
        cols["worker"].append(worker)
        cols["seconds"].append(seconds)
        cols["failed"].append(failed)
        self._records.append(record)

    # ----------------------------------------------------------------------------- records
    def records_since(self, since: int = 0, limit: int | None = None) -> dict:
        """Records from offset `since` (file order), as the campaign wrote them (NaN -> null)."""
        self.refresh()
        since = max(0, since)
        # Pages of at most MAX_RECORDS: one huge answer would hold the interpreter for seconds.
        limit = MAX_RECORDS if limit is None else max(0, min(limit, MAX_RECORDS))
        with self._lock:
            total = len(self._records)
            stop = max(since, min(total, since + limit))
            records = self._records[since:stop]
        return {"since": since, "next": stop, "total": total, "records": _safe_records(records)}

    def columns_since(self, since: int = 0) -> dict:
        """The plotted fields of the records from `since`, one list per field (compact)."""
        self.refresh()
        with self._lock:
            since = max(0, since)
            total = len(self._records)
            return {"since": since, "next": total, "total": total,
                    "columns": {c: self._columns[c][since:total] for c in COLUMNS}}

    def columns_json(self, since: int = 0) -> bytes:
        """`columns_since` as JSON bytes; the answer from 0 (every page load) is cached."""
        data = self.columns_since(since)
        if data["since"] != 0:
            return _dumps(data)
        with self._lock:
            cached = self._columns_cache
        if cached is not None and cached[0] == data["total"]:
            return cached[1]
        body = _dumps(data)
        with self._lock:
            self._columns_cache = (data["total"], body)
        return body

    def warm(self) -> None:
        """Read the whole log and serialise it once, so the first page load is quick."""
        self.columns_json(0)

    # ----------------------------------------------------------------------------- config
    def config(self) -> dict:
        """config.yaml as a mapping ({} when missing or unreadable); re-read when it changes."""
        path = self.path / CONFIG_FILE
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if mtime != self._config_mtime:
            try:
                loaded = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as exc:
                log.warning("%s: cannot read config (%s)", path, exc)
                loaded = None
            self._config = loaded if isinstance(loaded, dict) else {}
            self._config_mtime = mtime
        return self._config or {}

    def config_text(self) -> str:
        """config.yaml as written ('' when missing)."""
        try:
            return (self.path / CONFIG_FILE).read_text()
        except FileNotFoundError:
            return ""

    def budget(self) -> int | None:
        """Search evaluations the campaign will run: strategy total_iter + 1 or budget, capped."""
        cfg = self.config()
        strategy = cfg.get("strategy") or {}
        total = strategy.get("total_iter") if isinstance(strategy, dict) else None
        total = int(total) + 1 if total is not None else None
        if total is None and isinstance(strategy, dict) and strategy.get("budget") is not None:
            total = int(strategy["budget"])
        cap = (cfg.get("budget") or {}).get("max_evaluations")
        known = [int(x) for x in (total, cap) if x is not None]
        return min(known) if known else None

    def final_summary(self) -> dict | None:
        """summary.json (written when the campaign ends) plus its method `rows`, or None.

        `rows` (`eep.summary.method_rows`) is what the page and the report render: each method's
        label and row kind in table order, labels derived for summaries that predate them.
        """
        path = self.path / SUMMARY_FILE
        try:
            summary = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # absent, or being replaced right now
        if not isinstance(summary, dict):
            return None
        return {**summary, "rows": method_rows(summary)}

    # ----------------------------------------------------------------------------- status
    def status(self) -> str:
        """waiting (nothing yet), running, stopped (no new evaluation for a while), finished."""
        if (self.path / SUMMARY_FILE).is_file():
            return "finished"
        try:
            mtime = (self.path / EVALUATIONS_FILE).stat().st_mtime
        except FileNotFoundError:
            return "waiting"
        with self._lock:
            recent = list(self._totals.recent)
        # A campaign is live while evaluations keep coming at about their usual pace.
        typical = (recent[-1] - recent[0]) / (len(recent) - 1) if len(recent) > 1 else 0.0
        stale_after = max(120.0, 10 * typical)
        if not recent and (self.path / CONFIG_FILE).is_file():
            return "running" if time.time() - mtime < stale_after else "waiting"
        return "running" if time.time() - mtime < stale_after else "stopped"

    def overview(self) -> dict:
        """What `/api/runs` lists for this run: name, path, status, counts, best."""
        self.refresh()
        status = self.status()
        with self._lock:
            t = self._totals
            best = None
            if t.best_index is not None:
                best = {"id": t.best_id, "score": t.best_score, "index": t.best_index}
            return json_safe({
                "name": self.name,
                "path": str(self.path),
                "status": status,
                "counts": {"records": len(self._records), "search": t.search, "failed": t.failed,
                           "splits": dict(t.splits)},
                "budget": self.budget(),
                "phase": t.phase,
                "best": best,
            })

    def summary(self) -> dict:
        """Everything the page shows besides the curves: facts, progress, workers, final table."""
        overview = self.overview()
        cfg = self.config()
        strategy = cfg.get("strategy") if isinstance(cfg.get("strategy"), dict) else {}
        task = cfg.get("task")
        with self._lock:
            t = self._totals
            progress = self._progress(overview["budget"], overview["status"])
            held_out = {
                split: [self._held_out_row(r) for r in rows.values()]
                for split, rows in t.held_out.items()
            }
            summary = {
                **overview,
                "config": {
                    "name": cfg.get("name"),
                    "model": cfg.get("model"),
                    "task": task.get("name") if isinstance(task, dict) else task,
                    "keep": cfg.get("keep"),
                    "top_k": cfg.get("top_k"),
                    "router_mapping": cfg.get("router_mapping"),
                    "strategy": strategy.get("kind"),
                    "workers": cfg.get("workers"),
                    "seed": cfg.get("seed"),
                },
                "progress": progress,
                "phase_boundary": t.phase_boundary,
                "best_steps": [list(s) for s in t.best_steps],
                "workers": self._worker_rows(),
                "held_out": held_out,
                "skipped_lines": self._skipped,
                "final": self.final_summary(),
            }
        return json_safe(summary)

    def _held_out_row(self, record: dict) -> dict:
        record_id = str(record.get("id", ""))
        return {
            "id": record_id,
            "phase": record.get("phase"),
            "score": finite(record.get("score")),
            "error": record.get("error"),
            "at": self._search_index.get(record_id),  # where the candidate was searched
        }

    def _progress(self, budget: int | None, status: str) -> dict:
        t = self._totals
        recent = list(t.recent)
        rate = None  # search evaluations per second, over the last few
        if len(recent) > 1 and recent[-1] > recent[0]:
            rate = (len(recent) - 1) / (recent[-1] - recent[0])
        eta = None
        if budget is not None and rate and status == "running":
            eta = max(0, budget - t.search) / rate
            max_seconds = (self.config().get("budget") or {}).get("max_seconds")
            if max_seconds is not None:
                eta = min(eta, max(0.0, float(max_seconds) - t.last_elapsed))
        return {
            "done": t.search,
            "budget": budget,
            "fraction": min(1.0, t.search / budget) if budget else None,
            "rate_per_min": rate * 60 if rate else None,
            "eta_seconds": eta,
            "elapsed": t.last_elapsed,
            "examples": t.examples,
            "rejected": t.rejected,
            "first_time": t.first_time,
            "last_time": t.last_time,
        }

    def _worker_rows(self) -> list[dict]:
        t = self._totals
        span = (t.last_time - t.first_time) if t.first_time is not None and t.last_time else 0.0
        rows = []
        for name, w in sorted(t.workers.items()):
            rows.append({
                "worker": name,
                "evaluations": w.count,
                "failed": w.failed,
                "per_min": w.count / (span / 60) if span > 0 else None,
                "mean_seconds": w.busy / w.count if w.count else None,
                # Share of the run's wall time this worker spent evaluating.
                "utilisation": min(1.0, w.busy / span) if span > 0 else None,
                "last_time": w.last or None,
            })
        return rows

    # ----------------------------------------------------------------------------- best
    def best(self) -> dict | None:
        """The best search candidate: id, score, index, and its matrices as nested lists."""
        self.refresh()
        with self._lock:
            t = self._totals
            if t.best_index is None:
                return None
            info = {"id": t.best_id, "score": t.best_score, "index": t.best_index}
        info.update(self.candidate(info["id"]) or {"layers": None, "missing": True})
        return json_safe(info)

    def candidate(self, candidate_id: str) -> dict | None:
        """A saved candidate's matrices and metadata, or None when it is not (yet) on disk."""
        if not _SAFE_ID.match(candidate_id):
            return None  # ids come from the file; never let one name a path elsewhere
        directory = self.path / CANDIDATES_DIR
        path = directory / f"{candidate_id}.safetensors"
        if path.resolve().parent != directory.resolve():
            return None
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        cached = self._candidates.get(candidate_id)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        from eep.candidate import Candidate, CandidateError  # torch only when a map is asked for

        try:
            candidate = Candidate.load(path)
        except (CandidateError, OSError) as exc:
            log.warning("%s", exc)
            return None
        data = {
            "num_experts": candidate.num_experts,
            "keep": candidate.keep_per_layer,
            "top_k": candidate.top_k,
            "router_mapping": candidate.router_mapping,
            "phase": candidate.phase,
            "parents": list(candidate.parents),
            "pure_pruning": candidate.is_pure_pruning(),
            "kept": candidate.kept_experts(),
            "layers": [
                {"router_map": r.tolist(), "expert_merge": m.tolist()}
                for r, m in zip(candidate.router_map, candidate.expert_merge, strict=True)
            ],
        }
        if len(self._candidates) > 16:
            self._candidates.clear()
        self._candidates[candidate_id] = (mtime, data)
        return data


def unique_names(paths: list[Path]) -> list[str]:
    """A short URL-safe name per run directory: its folder name, made unique with -2, -3..."""
    names: list[str] = []
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name) or "run"
        base = base.lstrip(".") or "run"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def is_run_dir(path: Path) -> bool:
    """True for a folder that holds a campaign's config.yaml or evaluations.jsonl."""
    return (path / CONFIG_FILE).is_file() or (path / EVALUATIONS_FILE).is_file()

