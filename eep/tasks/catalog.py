"""What `eep tasks` says about a task: kind, source, metrics, split sizes, offline availability.

Availability is checked without network: a built-in task always is; a JSONL task when its files
exist; a Hugging Face task when its local data files exist (`path: json` with `data_files`) or
the dataset is in the local `datasets` or hub cache (a run then needs no download, given
`HF_DATASETS_OFFLINE=1`). A cached copy may still lack the config or split a spec names: the
check says "cached", not "loads".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from eep.tasks.registry import available_tasks, resolve_task
from eep.tasks.scorers import primary_metric, search_metric
from eep.tasks.spec import HFSource, JsonlSource, TaskSpec

# `datasets` builders for local files: `path: json` etc. read `data_files`, nothing is downloaded.
_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})


@dataclass(frozen=True)
class TaskInfo:
    """One row of the `eep tasks` table."""

    name: str
    kind: str
    source: str
    metric: str
    search_metric: str
    splits: tuple[int, int, int]  # search, dev, test
    offline: str  # "yes", "cached", "no (download)", "no (missing FILE)"
    description: str = ""


def describe_source(spec: TaskSpec) -> str:
    """`built-in`, `hf:PATH[/CONFIG]` or `file:PATH` (the first file of a per-split source)."""
    source = spec.source
    if isinstance(source, JsonlSource):
        paths = source.path if isinstance(source.path, str) else source.path["search"]
        return f"file:{paths}"
    if isinstance(source, HFSource):
        if source.path in _LOCAL_BUILDERS:
            return f"file:{_first_file(source.data_files) or source.path}"
        return f"hf:{source.path}" + (f"/{source.name}" if source.name else "")
    return "built-in"


def offline_status(spec: TaskSpec) -> str:
    """Whether the task's data can be read now without network (see the module docstring)."""
    source = spec.source
    if isinstance(source, JsonlSource):
        paths = [source.path] if isinstance(source.path, str) else list(source.path.values())
        return _files_status(paths)
    if isinstance(source, HFSource):
        if source.path in _LOCAL_BUILDERS:
            return _files_status(_all_files(source.data_files))
        return "cached" if _hf_cached(source.path) else "no (download)"
    return "yes"


def task_info(name_or_spec: str | TaskSpec) -> TaskInfo:
    """The table row of one task."""
    spec = resolve_task(name_or_spec)
    return TaskInfo(
        name=spec.name,
        kind=spec.scorer or "",
        source=describe_source(spec),
        metric=primary_metric(spec),
        search_metric=search_metric(spec),
        splits=(spec.splits.search, spec.splits.dev, spec.splits.test),
        offline=offline_status(spec),
        description=spec.description,
    )


def task_table() -> list[TaskInfo]:
    """Every task `--task` accepts by name, built-in ones first."""
    return [task_info(name) for name in available_tasks()]


def format_table(rows: list[TaskInfo]) -> str:
    """Fixed-width text table of task rows, one line each."""
    header = ("NAME", "KIND", "SOURCE", "METRIC", "SEARCH METRIC", "SEARCH/DEV/TEST", "OFFLINE")
    body = [
        (
            r.name,
            r.kind,
            r.source,
            r.metric,
            r.search_metric,
            "/".join(str(n) for n in r.splits),
            r.offline,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *body)
    )


def format_examples(spec: TaskSpec, split: str, n: int) -> str:
    """The first `n` examples of a split as the model gets them: prompt, options, gold answer.

    Prompt lines are printed verbatim after `| `; options and answers as Python literals, so
    leading and trailing spaces show. For multiple choice the model scores each option's tokens
    after the prompt (a trailing space of the prompt moves to the option, as in
    lm-evaluation-harness); for generation it continues the prompt greedily.
    """
    from eep.tasks.loaders import load_examples

    examples = load_examples(spec, split)[:n]
    blocks = []
    for ex in examples:
        lines = [f"--- {ex.id} ({split})", *(f"| {line}" for line in ex.prompt.split("\n"))]
        trailing = len(ex.prompt) - len(ex.prompt.rstrip(" "))
        if trailing:
            lines.append(f"  (the prompt ends with {trailing} space{'s' * (trailing > 1)})")
        if ex.options:
            for i, option in enumerate(ex.options):
                mark = "  <- gold" if i == ex.label else ""
                lines.append(f"  option {i}: {option!r}{mark}")
        else:
            lines.append(f"  gold: {' | '.join(repr(a) for a in ex.answers)}")
            stops = f", stop at {list(spec.stop)!r}" if spec.stop else ""
            lines.append(f"  generation: greedy, up to {spec.max_new_tokens} tokens{stops}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _first_file(data_files) -> str | None:
    files = _all_files(data_files)
    return files[0] if files else None


def _all_files(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, list):
        return list(data_files)
    out: list[str] = []
    for value in data_files.values():
        out.extend([value] if isinstance(value, str) else value)
    return out


def _files_status(paths: list[str]) -> str:
    if not paths:
        return "no (no data_files)"
    missing = [p for p in paths if not Path(p).is_file()]
    return f"no (missing {missing[0]})" if missing else "yes"


def _hf_cached(path: str) -> bool:
    """True when the dataset is in the hub cache or the `datasets` cache (no network)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}" / "snapshots"
    if hub.is_dir() and any(hub.iterdir()):
        return True
    datasets_cache = Path(
        os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets")
    )
    prepared = datasets_cache / path.replace("/", "___")
    return prepared.is_dir() and any(prepared.iterdir())
