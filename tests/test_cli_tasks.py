"""`eep tasks`: the table (kind, source, metrics, split sizes, offline) and `--show`."""

from __future__ import annotations

import pytest
import yaml
from huggingface_hub import constants

from eep.builtin.tokenizer import build_tokenizer
from eep.cli import main
from eep.fitness import Evaluator
from eep.models.loading import LoadedModel
from eep.models.testing import tiny_model
from eep.tasks.catalog import task_info
from eep.tasks.registry import available_tasks


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Hub and `datasets` caches pointed at empty folders: nothing is cached."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


def table_rows(capsys) -> dict[str, list[str]]:
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert lines[0].split()[:3] == ["NAME", "KIND", "SOURCE"]
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_table_has_every_task_with_kind_source_metrics_splits(empty_caches, capsys):
    rows = table_rows(capsys)
    assert list(rows) == available_tasks()
    assert rows["add"] == ["add", "generate", "built-in", "exact_match", "exact_match",
                           "200/200/500", "yes"]
    assert rows["compare"][1:3] == ["multiple_choice", "built-in"]
    # A shipped Hugging Face spec: its dataset path and config, its own metric and split sizes.
    assert rows["arc_easy"] == ["arc_easy", "multiple_choice", "hf:allenai/ai2_arc/ARC-Easy",
                                "acc_norm", "acc_norm", "200/200/500", "no", "(download)"]
    assert rows["wsc_eep"][1] == "eep-compat" and rows["wsc_eep"][5] == "300/150/104"


def test_offline_column_follows_the_caches(empty_caches):
    assert task_info("boolq").offline == "no (download)"
    snapshot = empty_caches / "hub" / "datasets--aps--super_glue" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert task_info("boolq").offline == "cached"
    assert task_info("arc_easy").offline == "no (download)"
    (empty_caches / "datasets" / "allenai___ai2_arc" / "ARC-Easy").mkdir(parents=True)
    assert task_info("arc_easy").offline == "cached"


def test_file_tasks_show_their_file_and_whether_it_exists(tmp_path):
    data = tmp_path / "qa.jsonl"
    spec = {
        "name": "qa", "source": {"kind": "jsonl", "path": "qa.jsonl"}, "fields": {"q": "q", "a": "a"},
        "prompt": "{q}", "scorer": "generate", "answers": "a", "search_metric": "f1",
    }
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(spec))
    info = task_info(str(path))
    assert info.source == f"file:{data}" and info.offline == f"no (missing {data})"
    assert (info.metric, info.search_metric) == ("exact_match", "f1")
    data.write_text('{"q": "x=", "a": "y"}\n')
    assert task_info(str(path)).offline == "yes"
    hf_json = {**spec, "source": {"kind": "hf", "path": "json", "split": "train",
                                  "data_files": "qa.jsonl"}}
    path.write_text(yaml.safe_dump(hf_json))
    assert (task_info(str(path)).source, task_info(str(path)).offline) == (f"file:{data}", "yes")


def shown_prompts(out: str) -> list[str]:
    """The prompts `--show` printed, from its `| ` lines."""
    prompts: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith("--- "):
            prompts.append([])
        elif line.startswith("| "):
            prompts[-1].append(line[2:])
    return ["\n".join(p) for p in prompts]


def test_show_prints_what_the_evaluator_feeds_the_model(tmp_path, capsys):
    """A few-shot, chat-wrapped spec: `--show` prints the evaluator's prompts verbatim."""
    spec = {
        "name": "compare_shots", "source": {"kind": "builtin", "name": "compare"},
        "prompt": "Q: {prompt}", "few_shot": 2, "few_shot_separator": "\n",
        "chat": "<s>{prompt}</s>", "splits": {"search": 4, "dev": 4, "test": 4},
    }
    path = tmp_path / "compare_shots.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["tasks", "--show", str(path), "--split", "dev", "-n", "3"]) == 0
    out = capsys.readouterr().out
    tokenizer = build_tokenizer()
    loaded = LoadedModel(tiny_model("mixtral", vocab_size=len(tokenizer)), tokenizer, "", "t")
    examples = Evaluator(loaded, str(path), split="dev").examples[:3]
    assert shown_prompts(out) == [ex.prompt for ex in examples]
    assert all("\n" in ex.prompt for ex in examples)  # the shots really are there
    for ex in examples:
        assert f"--- {ex.id} (dev)" in out
        for i, option in enumerate(ex.options):
            gold = "  <- gold" if i == ex.label else ""
            assert f"  option {i}: {option!r}{gold}\n" in out + "\n"


def test_show_generation_prints_gold_and_budget(capsys):
    assert main(["tasks", "--show", "add", "-n", "2", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- add-test-") == 2
    assert "  gold: '" in out and "generation: greedy, up to 4 tokens" in out


def test_show_errors_name_the_task_or_count(capsys):
    assert main(["tasks", "--show", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["tasks", "--show", "add", "-n", "0"]) == 2
    assert "-n must be >= 1" in capsys.readouterr().err
