"""bench/gpu.py --tiny runs on the CPU and reports every figure, so the GPU script cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_bench_tiny_on_cpu(tmp_path):
    """A tiny CPU run prints the tables and writes positive, finite figures to --out."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # --out decides where, not $OUT
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    headers = ("| surgery apply |", "| fitness (", "| memory (keep 4) |", "measured peak | n/a")
    for header in headers:
        assert header in proc.stdout, proc.stdout

    figures = json.loads(out.read_text())
    assert _positive(figures["matmul"]["flops_per_s"])
    assert _positive(figures["active_params"]["layers"])
    assert figures["active_params"]["x32"] > figures["active_params"]["layers"]
    for name in ("prune", "merge"):
        apply = figures["apply"][name]
        assert all(_positive(apply[key]) for key in ("seconds", "per_layer_s", "x32_s")), apply

    rows = {row["kind"]: row for row in figures["fitness"]}
    assert set(rows) == {"accuracy", "likelihood", "kl"}
    for row in rows.values():
        for key in ("tokens", "seconds", "tokens_per_s", "floor_s", "over_floor",
                    "x32_tokens_per_s", "x32_floor_tokens_per_s"):
            assert _positive(row[key]), (key, row)
        assert row["examples"] == 8

    memory = figures["memory"]
    assert "peak_bytes" not in memory  # CUDA-only
    assert _positive(memory["predicted"]["total_bytes"])
    assert memory["predicted_x32"]["originals_bytes"] > memory["predicted"]["originals_bytes"]
