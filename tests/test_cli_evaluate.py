"""`eep evaluate` and `eep tasks`, run in-process through `eep.cli.main`."""

from __future__ import annotations

import json

import pytest
import yaml

from eep.candidate import Candidate
from eep.cli import main
from eep.fitness import Evaluator
from eep.models.testing import save_tiny_model
from eep.tasks.registry import available_tasks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Mixtral with the character tokenizer, saved as a model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "mixtral")


def evaluate_json(capsys, *argv: str) -> dict:
    assert main(["evaluate", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out  # one JSON object, nothing else on stdout
    return json.loads(out)


def test_json_output_shape(model_dir, capsys):
    out = evaluate_json(capsys, "--model", model_dir, "--task", "compare", "--limit", "6")
    for key in ("score", "metric", "metrics", "count", "seconds", "tokens_per_second"):
        assert key in out
    assert 0.0 <= out["score"] <= 1.0 and out["metric"] == "acc"
    assert set(out["metrics"]) == {"acc", "acc_norm", "label_prob"}
    assert out["count"] == 6 and out["split"] == "search" and out["error"] is None
    assert out["seconds"] > 0 and out["tokens_per_second"] > 0
    assert "hits" not in out


def test_candidate_and_split(model_dir, tmp_path, capsys):
    path = Candidate.random_pruning(3, 8, keep=4, generator=0).save(tmp_path / "c.safetensors")
    argv = ["--model", model_dir, "--task", "count", "--split", "dev", "--limit", "4"]
    full = evaluate_json(capsys, *argv)
    pruned = evaluate_json(capsys, *argv, "--candidate", str(path))
    assert full["split"] == pruned["split"] == "dev" and pruned["candidate"] == str(path)
    assert full["metric"] == "exact_match" and pruned["count"] == 4


def test_candidate_changes_the_score_as_the_evaluator_does(tmp_path, capsys):
    # The trained tiny model sorts almost perfectly; keeping 2 of 8 experts per layer breaks
    # some answers, so a CLI that ignored --candidate would print the full model's numbers.
    path = Candidate.random_pruning(4, 8, keep=2, generator=0).save(tmp_path / "keep2.safetensors")
    argv = ["--model", "builtin:tiny-moe", "--task", "sort", "--limit", "16", "--batch-size", "16"]
    full = evaluate_json(capsys, *argv)
    pruned = evaluate_json(capsys, *argv, "--candidate", str(path))
    assert full["score"] >= 0.9, full
    assert pruned["score"] < full["score"] - 0.1, (pruned, full)
    assert pruned["metrics"] != full["metrics"]

    evaluator = Evaluator("builtin:tiny-moe", "sort", batch_size=16, max_examples=16)
    for out, candidate in ((full, None), (pruned, Candidate.load(path))):
        direct = evaluator.evaluate(candidate)
        assert (out["score"], out["metrics"], out["count"]) == (
            direct.score,
            direct.metrics,
            direct.count,
        )

    assert main(["evaluate", *argv, "--candidate", str(path)]) == 0
    human = capsys.readouterr().out
    assert human.startswith(f"sort [search]: exact_match {pruned['score']:.4f} ("), human


@pytest.mark.parametrize(("fitness", "metric"), [("likelihood", "loglik"), ("kl", "neg_kl")])
def test_fitness_kinds(model_dir, capsys, fitness, metric):
    argv = ["--model", model_dir, "--task", "count", "--limit", "4", "--fitness", fitness]
    out = evaluate_json(capsys, *argv)
    direct = Evaluator(model_dir, "count", max_examples=4, fitness=fitness).evaluate()
    assert out["metric"] == metric and out["fitness"] == fitness
    assert out["score"] == pytest.approx(direct.score)


def test_human_output(model_dir, capsys):
    assert main(["evaluate", "--model", model_dir, "--task", "compare", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compare [search]: acc ") and "acc_norm" in out
    assert "4 examples in" in out and "tokens/s" in out


def write_spec(tmp_path, **changes) -> str:
    data = {
        "name": "broken",
        "source": {"kind": "jsonl", "path": str(tmp_path / "missing.jsonl")},
        "fields": {"q": "q", "a": "a"},
        "prompt": "{q}",
        "scorer": "generate",
        "answers": "a",
        **changes,
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_errors_exit_2_with_the_task_message(model_dir, tmp_path, capsys):
    def fails(task: str, message: str) -> None:
        assert main(["evaluate", "--model", model_dir, "--task", task]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eep evaluate: error:") and message in err

    fails("no-such-task", "unknown task 'no-such-task'")
    fails(write_spec(tmp_path), "JSONL file not found")
    (tmp_path / "data.jsonl").write_text('{"q": "a=", "a": "b"}\n')
    empty = {"search": 0, "dev": 1, "test": 0}
    fails(
        write_spec(tmp_path, source={"kind": "jsonl", "path": "data.jsonl"}, splits=empty), "empty"
    )


def test_missing_candidate_file_exits_2(model_dir, tmp_path, capsys):
    argv = ["evaluate", "--model", model_dir, "--task", "count", "--candidate", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "candidate file not found" in capsys.readouterr().err


def test_tasks_lists_every_task(capsys):
    assert main(["tasks", "--names"]) == 0
    assert capsys.readouterr().out.splitlines() == available_tasks()
