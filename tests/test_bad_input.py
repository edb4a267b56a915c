"""A hostile user's probes: every bad input ends in one error line naming the culprit, changes nothing.

Each case runs the CLI in-process (`eep.cli.main`) and checks: a non-zero exit, exactly one
`eep CMD: error: ...` line on stderr that names the file, field or value, no traceback, and the
same files (content and modification time) under the test's folder before and after. Only the
lock tests start a second process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eep.builtin.tokenizer import build_tokenizer
from eep.candidate import Candidate
from eep.cli import main
from eep.config import config_from_dict
from eep.models.testing import tiny_model
from eep.runlog import LOCK_FILE, RunLog

TASK = {
    "name": "add", "source": {"kind": "builtin", "name": "add"}, "scorer": "generate",
    "max_new_tokens": 4, "splits": {"search": 4, "dev": 4, "test": 4, "seed": 0},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny top-2 Mixtral with 8 experts, 2 MoE layers, and a tokenizer."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("mixtral", num_layers=2).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def campaign_yaml(path: Path, model: str, **fields) -> Path:
    data = {"name": "probe", "model": model, "task": TASK, "keep": 4,
            "strategy": {"kind": "random", "budget": 6}, "output": {"export": False}} | fields
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def candidate_file(path: Path, meta: object, raw: str | None = None) -> Path:
    tensors = {f"layers.{i}.{n}": torch.eye(8)[:4].contiguous() for i in range(2)
               for n in ("router_map", "expert_merge")}
    save_file(tensors, str(path), metadata={"eep": raw if raw is not None else json.dumps(meta)})
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its content hash and mtime (the lock file's pid line excepted)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == LOCK_FILE:
            out[str(p)] = ("lock",)
        elif p.is_file():
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            out[str(p)] = ("dir",)
    return out


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """transformers' weight-loading bar also writes to stderr; these tests read stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `eep ARGV` run in this process."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------- the table
# Each case: (id, setup(tmp, model_dir) -> argv, words the error line must contain).
Setup = Callable[[Path, Path], list[str]]


def _non_utf8(tmp: Path, model: Path) -> list[str]:
    (tmp / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    return ["validate", str(tmp / "latin1.yaml")]


def _folder_as_config(tmp: Path, model: Path) -> list[str]:
    (tmp / "configs.yaml").mkdir()
    return ["validate", str(tmp / "configs.yaml")]


def _unreadable_config(tmp: Path, model: Path) -> list[str]:
    return ["validate", "/proc/self/mem"]  # a regular file whose read fails (EIO), even for root


def _validate(**fields) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        return ["validate", str(campaign_yaml(tmp / "c.yaml", **{"model": str(model)} | fields))]
    return setup


def _broken_model_config(tmp: Path, model: Path) -> list[str]:
    (tmp / "broken").mkdir()
    (tmp / "broken" / "config.json").write_text('{"model_type": "mixtral", ')
    return ["validate", str(campaign_yaml(tmp / "c.yaml", str(tmp / "broken")))]


def _model_without_weights(tmp: Path, model: Path) -> list[str]:
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "config.json").write_bytes((model / "config.json").read_bytes())
    return ["evaluate", "--model", str(tmp / "noweights"), "--task", "add", "--limit", "2"]


def _search_into_unrelated_folder(tmp: Path, model: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("not an eep run")
    return ["search", str(campaign_yaml(tmp / "c.yaml", str(model))), "--run-dir", str(tmp / "mine"), "--quiet"]


def _resume_with_search_change(tmp: Path, model: Path) -> list[str]:
    config = campaign_yaml(tmp / "c.yaml", str(model))
    from eep.config import load_config

    RunLog.create(tmp / "run", load_config(config).to_yaml()).release()
    return ["search", str(config), "--resume", str(tmp / "run"), "--set", "strategy.budget=50", "--quiet"]


def _record(i: int) -> str:
    return json.dumps({"id": f"random-{i:05d}", "hash": f"h{i}", "split": "search", "score": 0.5,
                       "asked": i + 1, "phase": "prune"}) + "\n"


def _resume_over_damaged_log(tmp: Path, model: Path) -> list[str]:
    config = campaign_yaml(tmp / "c.yaml", str(model))
    from eep.config import load_config

    RunLog.create(tmp / "run", load_config(config).to_yaml()).release()
    (tmp / "run" / "evaluations.jsonl").write_text(_record(0) + "garbage\n" + _record(2) + '{"id": "torn')
    return ["search", str(config), "--resume", str(tmp / "run"), "--quiet"]


def _resume_over_deep_line(tmp: Path, model: Path) -> list[str]:
    config = campaign_yaml(tmp / "c.yaml", str(model))
    from eep.config import load_config

    RunLog.create(tmp / "run", load_config(config).to_yaml()).release()
    (tmp / "run" / "evaluations.jsonl").write_text(_record(0) + "[" * 100_000 + "\n" + _record(1))
    return ["search", str(config), "--resume", str(tmp / "run"), "--quiet"]


def _candidate_meta(meta: object = None, raw: str | None = None) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        path = candidate_file(tmp / "bad.safetensors", meta, raw)
        return ["evaluate", "--model", str(model), "--task", "add", "--candidate", str(path), "--limit", "2"]
    return setup


GOOD_META = {"num_layers": 2, "num_experts": 8}


def _evaluate(*extra: str) -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        return ["evaluate", "--model", str(model), "--task", "add", "--limit", "2", *extra]
    return setup


def _prune(*extra: str, out: str = "c.safetensors") -> Setup:
    def setup(tmp: Path, model: Path) -> list[str]:
        (tmp / "existing").mkdir()
        texts = tmp / "texts.jsonl"
        texts.write_text('{"text": "a fine text"}\n{"text": null}\n')
        argv = ["prune", "--model", str(model), "--method", "frequency", "--out", str(tmp / out)]
        return argv + [a.replace("TEXTS", str(texts)) for a in extra]
    return setup


def _evil_pth(tmp: Path, model: Path) -> list[str]:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'PWNED'}",))

    torch.save({"layers.0": Evil()}, tmp / "evil.pth")
    return ["import-reference", str(tmp / "evil.pth"), "--out", str(tmp / "c.safetensors"), "--num-layers", "2"]


def _export_overflow(tmp: Path, model: Path) -> list[str]:
    # Coefficients of 3e38 are finite in the candidate (float32) but the merged weights overflow.
    rows = [torch.full((4, 8), 3e38) for _ in range(4)]
    Candidate(rows[:2], rows[2:], num_experts=8, router_mapping="logits").save(tmp / "huge.safetensors")
    return ["export", "--model", str(model), "--candidate", str(tmp / "huge.safetensors"), "--out", str(tmp / "out")]


CASES: list[tuple[str, Setup, list[str]]] = [
    ("export-overflowing-merge", _export_overflow, ["model.layers.0.mlp.", "inf"]),
    ("non-utf8-yaml", _non_utf8, ["latin1.yaml", "UTF-8"]),
    ("config-is-a-folder", _folder_as_config, ["configs.yaml", "folder"]),
    ("unreadable-config", _unreadable_config, ["/proc/self/mem", "cannot read"]),
    ("validate-keep-9-of-8", _validate(keep=9), ["keep=9"]),
    ("validate-missing-model", lambda t, m: _validate(model="/nonexistent/model")(t, m), ["/nonexistent/model"]),
    ("validate-unknown-builtin", lambda t, m: _validate(model="builtin:bogus")(t, m), ["builtin:bogus"]),
    ("validate-pydantic-field", _validate(keep="four"), ["c.yaml", "keep"]),
    ("broken-model-config", _broken_model_config, ["broken", "config"]),
    ("model-without-weights", _model_without_weights, ["noweights", "weights"]),
    ("search-into-unrelated-folder", _search_into_unrelated_folder, ["mine", "not an eep run directory"]),
    ("resume-with-search-change", _resume_with_search_change, ["strategy.budget", "6 -> 50"]),
    ("resume-damaged-middle-line", _resume_over_damaged_log, ["evaluations.jsonl, line 2"]),
    ("resume-deep-line", _resume_over_deep_line, ["evaluations.jsonl, line 2", "nested"]),
    ("meta-without-num-layers", _candidate_meta({"num_experts": 8}), ["bad.safetensors", "num_layers"]),
    ("meta-text-top-k", _candidate_meta(GOOD_META | {"top_k": "2"}), ["bad.safetensors", "top_k", "'2'"]),
    ("meta-is-a-list", _candidate_meta([1, 2]), ["bad.safetensors", "list"]),
    ("meta-not-json", _candidate_meta(raw="{nope"), ["bad.safetensors", "not valid JSON"]),
    ("device-banana", _evaluate("--device", "banana"), ["banana"]),
    ("dashboard-port", lambda t, m: ["dashboard", str(t), "--port", "99999"], ["99999"]),
    ("prune-out-is-a-folder", _prune("--keep", "4", "--calibration", "builtin", out="existing"),
     ["existing", "folder"]),
    ("prune-keep-below-top-k", _prune("--keep", "1", "--calibration", "builtin"), ["keep=1", "top_k=2"]),
    ("prune-skip-quantile", _prune("--keep", "4", "--calibration", "builtin", "--skip", "--skip-quantile", "2"),
     ["skip_quantile", "2"]),
    ("prune-null-calibration-text", _prune("--keep", "4", "--calibration", "TEXTS"), ["texts.jsonl:2", "None"]),
    ("prune-calibration-samples-0", _prune("--keep", "4", "--calibration", "builtin", "--samples", "0"),
     ["samples"]),
    ("malicious-pth", _evil_pth, ["evil.pth", "refused"]),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-on-cpu-build", _evaluate("--device", "cuda"), ["cuda"]))


@pytest.mark.parametrize("setup,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, model_dir, capsys, setup, words):
    argv = setup(tmp_path, model_dir)
    capsys.readouterr()
    before = snapshot(tmp_path)
    rc, err = run_cli(argv, capsys)
    assert rc not in (0, None), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"eep {argv[0]}: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "https://" not in lines[0]
    assert "weights_only=False" not in lines[0] and "likely succeed" not in lines[0]  # never advise it
    assert snapshot(tmp_path) == before  # nothing written, nothing left behind (no .tmp, no run dir)


def test_hf_calibration_offline_is_one_line(tmp_path, model_dir, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    rc, err = run_cli(["prune", "--model", str(model_dir), "--method", "frequency", "--keep", "4",
                       "--calibration", "hf:nobody/nothing", "--out", str(tmp_path / "c.safetensors")], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == ("eep prune: error: hf:nobody/nothing: cannot load the dataset "
                           "(Couldn't reach 'nobody/nothing' on the Hub (LocalEntryNotFoundError))")
    assert list(tmp_path.iterdir()) == []


def test_failed_start_leaves_no_run_directory(tmp_path, model_dir, capsys):
    # The model has no weights: the campaign fails while starting, after the run directory exists.
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    config = campaign_yaml(tmp_path / "c.yaml", str(tmp_path / "noweights"), evaluation={"device": "cpu"})
    rc, err = run_cli(["search", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"], capsys)
    assert rc == 2 and "weights" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------- the lock
HOLD = textwrap.dedent("""
    import sys, time
    from eep.runlog import RunLog
    log = RunLog.open(sys.argv[1], lock=True)
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path, model_dir, capsys):
    config = campaign_yaml(tmp_path / "c.yaml", str(model_dir))
    from eep.config import load_config

    RunLog.create(tmp_path / "run", load_config(config).to_yaml()).release()
    proc = _hold_lock(tmp_path / "run")
    try:
        before = snapshot(tmp_path)
        for argv in (["search", str(config), "--resume", str(tmp_path / "run"), "--quiet"],
                     ["search", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"]):
            rc, err = run_cli(argv, capsys)
            assert rc == 2 and "Traceback" not in err
            assert f"{tmp_path / 'run'} is in use by another eep process (pid {proc.pid})" in err
        assert snapshot(tmp_path) == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The OS dropped the dead holder's lock: no stale lock to clean by hand.
    RunLog.open(tmp_path / "run", lock=True).release()


def test_lock_is_released_when_the_campaign_object_ends(tmp_path):
    cfg = config_from_dict({"model": "builtin:tiny-moe", "task": TASK, "keep": 4,
                            "strategy": {"kind": "random", "budget": 2}})
    first = RunLog.create(tmp_path / "run", cfg.to_yaml())
    with pytest.raises(ValueError, match="in use"):
        RunLog.open(tmp_path / "run", lock=True)
    first.release()
    RunLog.open(tmp_path / "run", lock=True).release()
