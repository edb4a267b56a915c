"""`eep evaluate --harness`: lm-eval on a candidate applied in memory, equal to eep's own scores.

The lm-eval task is a local JSONL file generated from the built-in `compare` task (lm-eval's
`dataset_path: json`), so the test needs no network; lm-eval is the optional extra `harness`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (extra `harness`)")

from eep.candidate import Candidate  # noqa: E402
from eep.cli import main  # noqa: E402
from eep.fitness import Evaluator, surgery_for  # noqa: E402
from eep.harness import run_harness  # noqa: E402
from eep.models.loading import LoadedModel, load_model  # noqa: E402
from eep.tasks.synthetic import make_examples  # noqa: E402

N = 40
TASK = "eep_compare"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """An lm-eval task over the first N test examples of `compare`, as eep's split has them."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "compare.jsonl"
    with data.open("w") as f:
        for ex in make_examples("compare", "test", N):
            f.write(json.dumps({"prompt": ex.prompt, "options": list(ex.options), "label": ex.label}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{options}}"\n'
        "doc_to_target: label\n"
        'target_delimiter: ""\n'  # eep's compare options follow the prompt's "=" directly
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    return folder


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model("builtin:tiny-moe")


def pruned(loaded: LoadedModel) -> Candidate:
    """Keep 2 of 8 experts: accuracy well below the full model's, so agreement means something."""
    ev_shape = Evaluator(loaded, "compare", split="test", max_examples=1)
    return Candidate.random_pruning(ev_shape.num_layers, ev_shape.num_experts, 2, generator=4)


def merged(loaded: LoadedModel) -> Candidate:
    """A `probs`-mode merge: lm-eval must see eep's mapped routers, in memory."""
    base = pruned(loaded)
    g = torch.Generator().manual_seed(0)
    return Candidate(
        router_map=[r + 0.2 * torch.rand(r.shape, generator=g) for r in base.router_map],
        expert_merge=[m + 0.2 * torch.rand(m.shape, generator=g) for m in base.expert_merge],
        num_experts=base.num_experts,
        router_mapping="probs",
    )


@pytest.mark.parametrize("make", [pruned, merged], ids=["pruned", "merged-probs"])
def test_harness_hits_equal_eep_evaluate(loaded, task_dir, make):
    candidate = make(loaded)
    surgery_for(loaded.model).restore()  # lm-eval must apply the candidate itself
    results = run_harness(
        loaded, [TASK], candidate=candidate, limit=N, include_path=task_dir, log_samples=True
    )
    ours = Evaluator(loaded, "compare", split="test", max_examples=N).evaluate(candidate)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in samples] == ours.hits
    assert results["results"][TASK]["acc,none"] == pytest.approx(ours.score, abs=1e-12)
    assert 0.2 < ours.score < 0.95  # neither trivial nor perfect


def test_unknown_task_and_missing_folder_are_named(loaded, task_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_harness(loaded, ["no_such_task_xyz"], limit=1, include_path=task_dir)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        run_harness(loaded, [TASK], limit=1, include_path=tmp_path / "nope")


def test_task_and_harness_exclude_each_other(capsys):
    assert main(["evaluate", "--model", "builtin:tiny-moe"]) == 2
    assert "give --task" in capsys.readouterr().err
    assert main(["evaluate", "--model", "x", "--task", "add", "--include-path", "."]) == 2
    assert "go with --harness" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_json_offline_equals_eep_evaluate(loaded, task_dir, tmp_path, capsys):
    """The real command in a fresh process with the Hugging Face libraries offline."""
    path = pruned(loaded).save(tmp_path / "pruned.safetensors")
    env = {**os.environ, **OFFLINE}
    argv = ["evaluate", "--model", "builtin:tiny-moe", "--candidate", str(path), "--limit", str(N)]
    proc = subprocess.run(
        [sys.executable, "-m", "eep", *argv, "--harness", TASK,
         "--include-path", str(task_dir), "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    harness = json.loads(proc.stdout.strip().splitlines()[-1])
    assert harness["candidate"] == str(path) and harness["n-shot"][TASK] == 0
    assert main([*argv, "--task", "compare", "--split", "test", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert harness["results"][TASK]["acc,none"] == pytest.approx(ours["score"], abs=1e-12)
