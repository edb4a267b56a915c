"""Kill a real `eep search` process at several points; the resumed run equals an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eep.models.loading import BUILTIN_MODELS
from eep.runlog import RunLog

pytestmark = pytest.mark.slow

CONFIG = """\
name: resume-test
model: builtin:tiny-moe
task:
  name: reverse
  source: {kind: builtin, name: reverse}
  scorer: generate
  max_new_tokens: 7
  splits: {search: 24, dev: 12, test: 24, seed: 0}
keep: 4
strategy: {kind: eep, init_population: 6, discrete_iter: 14, total_iter: 28, dev_top: 3}
final: {random_baselines: 1}
evaluation: {device: cpu, threads: 1, batch_size: 32}
output: {export: false, checkpoint_every: 5}
seed: 3
"""


def _search(config: Path, run_dir: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "eep", "search", str(config), "--quiet"]
    args += ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _search_records(run_dir: Path) -> int:
    path = run_dir / "evaluations.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"split": "search"' in line)


def _trace(run_dir: Path) -> list[tuple]:
    return [(r["id"], r["hash"], r["score"]) for r in RunLog.open(run_dir).records if r["split"] == "search"]


@pytest.mark.skipif(not (BUILTIN_MODELS["tiny-moe"] / "config.json").is_file(), reason="builtin:tiny-moe not trained")
def test_sigkill_at_several_points_then_resume(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    ref = _search(config, tmp_path / "ref", resume=False)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out.decode()
    want = _trace(tmp_path / "ref")
    assert len(want) == 29

    run_dir = tmp_path / "run"
    kept: list[bytes] = []
    for i, point in enumerate([3, 11, 20]):
        proc = _search(config, run_dir, resume=i > 0)
        deadline = time.time() + 300
        while _search_records(run_dir) < point and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert alive, f"eep search exited (code {proc.returncode}) before the kill at {point}"
        assert proc.returncode == -signal.SIGKILL
        # Killed mid-search: the log has some records (at least the kill point) but not all.
        assert point <= _search_records(run_dir) < len(want)
        before = (run_dir / "evaluations.jsonl").read_bytes()
        kept.append(before[: before.rfind(b"\n") + 1])  # a torn last line is dropped on resume
    proc = _search(config, run_dir, resume=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()
    assert _trace(run_dir) == want
    final = (run_dir / "evaluations.jsonl").read_bytes()
    assert all(final.startswith(prefix) for prefix in kept)  # no finished evaluation rewritten or lost
    assert (run_dir / "summary.json").is_file()
