"""The run directory under damage: torn lines, damaged lines, bad checkpoints, unrelated folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from eep.campaign import run_campaign
from eep.config import config_from_dict
from eep.models.loading import BUILTIN_MODELS
from eep.runlog import CHECKPOINT_FILE, EVALUATIONS_FILE, RunDirError, RunLog

TASK = {
    "name": "add", "source": {"kind": "builtin", "name": "add"}, "scorer": "generate",
    "max_new_tokens": 4, "splits": {"search": 4, "dev": 4, "test": 4, "seed": 0},
}


def record(i: int) -> str:
    return json.dumps({"id": f"random-{i:05d}", "hash": f"h{i}", "split": "search", "score": 0.5,
                       "asked": i + 1}) + "\n"


def new_run(path: Path) -> Path:
    RunLog.create(path, "name: x\n").release()
    return path


def test_only_a_torn_last_line_is_dropped(tmp_path):
    run = new_run(tmp_path / "run")
    (run / EVALUATIONS_FILE).write_text(record(0) + record(1) + '{"id": "random-0000')
    log = RunLog.open(run, lock=True)
    assert [r["id"] for r in log.records] == ["random-00000", "random-00001"]
    log.release()
    assert (run / EVALUATIONS_FILE).read_text() == record(0) + record(1)  # repaired by the writer


@pytest.mark.parametrize("bad", ["garbage", "[1, 2]", '{"id": "x"}', "[" * 100_000, '{"id": "a", "hash": "h", '
                                 '"split": "search", "score": 1}'])
def test_damage_before_the_end_stops_with_the_line_and_changes_nothing(tmp_path, bad):
    run = new_run(tmp_path / "run")
    text = record(0) + bad + "\n" + "".join(record(i) for i in range(1, 40))
    (run / EVALUATIONS_FILE).write_text(text)
    with pytest.raises(RunDirError, match=r"evaluations\.jsonl, line 2: damaged record"):
        RunLog.open(run, lock=True)
    assert (run / EVALUATIONS_FILE).read_text() == text  # 39 good records not truncated away
    other = RunLog(run)
    other.lock()  # the failed open released its lock
    other.release()


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all"])
def test_unreadable_checkpoint_reads_as_none_with_a_warning(tmp_path, caplog, content):
    run = new_run(tmp_path / "run")
    (run / CHECKPOINT_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="eep.runlog"):
        assert RunLog.open(run).read_checkpoint() is None
    assert "replaying the evaluation log from the start" in caplog.text


def test_create_refuses_files_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match="not an eep run directory"):
        RunLog.create(tmp_path / "mine", "name: x\n")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    RunLog.create(tmp_path / "empty", "name: x\n").release()  # an empty folder is fine


@pytest.mark.skipif(not (BUILTIN_MODELS["tiny-moe"] / "config.json").is_file(), reason="builtin:tiny-moe not trained")
def test_resume_over_a_corrupt_checkpoint_replays_the_log(tmp_path, caplog):
    cfg = config_from_dict({
        "model": "builtin:tiny-moe", "task": TASK, "keep": 4,
        "strategy": {"kind": "random", "budget": 6},
        "final": {"random_baselines": 1, "dev_top": 2},
        "evaluation": {"device": "cpu", "threads": 1},
        "output": {"run_dir": str(tmp_path / "run"), "export": False, "checkpoint_every": 2},
    })
    first = run_campaign(cfg, quiet=True)
    before = RunLog.open(tmp_path / "run").records
    (tmp_path / "run" / CHECKPOINT_FILE).write_bytes(b"")
    (tmp_path / "run" / "summary.json").unlink()
    with caplog.at_level(logging.WARNING, logger="eep.runlog"):
        again = run_campaign(cfg, resume=True, quiet=True)
    assert "checkpoint.safetensors is unreadable" in caplog.text
    assert RunLog.open(tmp_path / "run").records == before  # every score reused, none repeated
    assert again.summary["methods"] == first.summary["methods"]
