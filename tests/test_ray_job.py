"""`ray job submit --working-dir . -- eep search configs/tiny.yaml` against a real Ray head.

The head runs on loopback with the job server (dashboard) on a free port, its own temp dir, and
Ray 2.60's token authentication as a user meets it: head and submitter share a token
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN; a user would have it in ~/.ray/auth_token). The head is
`ray start --head --block` as our own child process and is stopped by signalling that process,
not with `ray stop` (which stops every Ray on the machine, other users' included).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv whose `ray` and `eep` the head and the job use
CONFIG = os.environ.get("EEP_RAY_JOB_CONFIG", "configs/tiny.yaml")  # dev override
JOB_TIMEOUT = 900
OVERRIDES = [
    "workers=2",  # two actors on the head's 2 CPUs: the job's driver uses RayPool
    "budget.max_evaluations=8",
    "final.random_baselines=1",
    "final.dev_top=2",
    "output.export=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback with the job server; yields (dashboard URL, environment)."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        OMP_NUM_THREADS="1",
    )
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    temp_dir = Path("/tmp") / f"eep-ray-{uuid.uuid4().hex[:8]}"  # socket paths must stay short
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
         "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while run([str(BIN / "ray"), "job", "list", "--address", address], env).returncode != 0:
            assert proc.poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, "the job server did not come up"
            time.sleep(2)
        yield address, env
    finally:
        # --block: on SIGTERM `ray start` stops the processes it started; the group is ours.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_a_campaign(head, tmp_path):
    if not (REPO / CONFIG).is_file():
        pytest.skip(f"{CONFIG} is not in the repository yet")
    address, env = head
    run_dir = tmp_path / "run"
    job_id = f"eep-test-{uuid.uuid4().hex[:8]}"
    entrypoint = ["eep", "search", CONFIG, "--quiet", "--run-dir", str(run_dir)]
    for item in OVERRIDES:
        entrypoint += ["--set", item]
    submit = run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--submission-id", job_id, "--no-wait", "--", *entrypoint],
        env,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr

    status = ""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        out = run([str(BIN / "ray"), "job", "status", "--address", address, job_id], env)
        # The CLI says "Job 'ID' succeeded" / "failed" / "was stopped".
        found = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out.stdout + out.stderr)
        status = found.group(1).upper() if found else ""
        if status:
            break
        time.sleep(3)
    if status != "SUCCEEDED":  # the job's own log says why
        logs = run([str(BIN / "ray"), "job", "logs", "--address", address, job_id], env)
        pytest.fail(f"job {job_id}: {status or 'timed out'}\n{logs.stdout}\n{logs.stderr}")

    records = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    search = [r for r in records if r["split"] == "search"]
    assert len(search) == 8
    assert {r["worker"] for r in records} <= {"ray-0", "ray-1"}  # scored by the pool's actors
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["search_evaluations"] == 8
