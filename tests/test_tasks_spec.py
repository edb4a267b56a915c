"""TaskSpec validation, YAML files, the resolver and the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from eep.tasks import synthetic
from eep.tasks.registry import SPECS_DIR, available_tasks, resolve_task, shipped_specs
from eep.tasks.spec import TaskError, TaskSpec

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"

PAPER_TASKS = [
    "boolq", "cb", "rte", "wic", "wsc", "record", "squad", "drop",
    "arc_challenge", "arc_easy", "hellaswag", "openbookqa", "winogrande", "gsm8k",
]  # fmt: skip
EEP_COMPAT = ["boolq_eep", "cb_eep", "rte_eep", "wic_eep", "wsc_eep", "squad_eep"]


def mc_spec(**overrides) -> dict:
    """A valid multiple-choice JSONL spec as a dict, to break one field at a time."""
    spec = {
        "name": "toy",
        "source": {"kind": "jsonl", "path": str(FIXTURES / "hf_boolq.jsonl")},
        "fields": {"passage": "passage", "question": "question", "label": "label"},
        "prompt": "{passage}\nQuestion: {question}?\nAnswer:",
        "scorer": "multiple_choice",
        "options": [" no", " yes"],
        "label": "label",
        "splits": {"search": 2, "dev": 1, "test": 1},
    }
    spec.update(overrides)
    return spec


def write_yaml(tmp_path: Path, data: dict, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("name", PAPER_TASKS + EEP_COMPAT)
def test_every_paper_task_is_shipped_and_valid(name):
    spec = TaskSpec.from_yaml(SPECS_DIR / f"{name}.yaml")
    assert spec.name == name
    assert spec.source.kind == "hf"


def test_shipped_specs_are_exactly_the_paper_tasks():
    assert sorted(shipped_specs()) == sorted(PAPER_TASKS + EEP_COMPAT)


def test_default_scorers_of_shipped_specs():
    generate = {"squad", "drop", "gsm8k", "record"}
    for name in PAPER_TASKS:
        expected = "generate" if name in generate else "multiple_choice"
        assert resolve_task(name).scorer == expected, name
    for name in EEP_COMPAT:
        spec = resolve_task(name)
        assert spec.scorer == "eep-compat" and spec.chat is not None, name


@pytest.mark.parametrize("name", shipped_specs())
def test_to_yaml_round_trips(name, tmp_path):
    spec = resolve_task(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(spec.to_yaml())
    assert TaskSpec.from_yaml(path) == spec


def test_builtin_spec_round_trips(tmp_path):
    spec = resolve_task("compare")
    path = tmp_path / "c.yaml"
    path.write_text(spec.to_yaml())
    assert TaskSpec.from_yaml(path) == spec


# --------------------------------------------------------------------------- resolver / registry


def test_available_tasks_lists_builtins_then_shipped():
    names = available_tasks()
    builtin = list(synthetic.SYNTHETIC_TASKS)
    assert names[: len(builtin)] == builtin
    assert names[len(builtin) :] == shipped_specs()


def test_resolve_builtin_name():
    spec = resolve_task("add")
    assert spec.source.kind == "builtin" and spec.scorer == "generate"
    assert spec.max_new_tokens == synthetic.max_new_tokens("add")
    assert resolve_task("compare").scorer == "multiple_choice"


def test_resolve_path_dict_and_spec(tmp_path):
    path = write_yaml(tmp_path, mc_spec())
    from_path = resolve_task(str(path))
    assert from_path.name == "toy"
    assert resolve_task(path) == from_path
    assert resolve_task(from_path) is from_path
    assert resolve_task(mc_spec()).name == "toy"


def test_unknown_task_name_lists_available():
    with pytest.raises(TaskError, match="unknown task 'nope'; available tasks: add, ") as info:
        resolve_task("nope")
    assert "boolq_eep" in str(info.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(TaskError, match="task spec file not found: .*missing.yaml"):
        resolve_task(str(tmp_path / "missing.yaml"))


def test_relative_jsonl_path_is_relative_to_the_yaml_file(tmp_path):
    (tmp_path / "data").mkdir()
    path = write_yaml(tmp_path, mc_spec(source={"kind": "jsonl", "path": "data/x.jsonl"}))
    spec = TaskSpec.from_yaml(path)
    assert spec.source.path == str(tmp_path / "data" / "x.jsonl")


# --------------------------------------------------------------------------- validation errors


def error_of(tmp_path: Path, data) -> str:
    path = write_yaml(tmp_path, data)
    with pytest.raises(TaskError) as info:
        TaskSpec.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid task spec") or message.startswith(str(path))
    return message


def test_error_names_file_and_field_for_unknown_key(tmp_path):
    message = error_of(tmp_path, mc_spec(promt="typo"))
    assert "promt: unknown field" in message


def test_error_names_nested_field(tmp_path):
    message = error_of(tmp_path, mc_spec(splits={"search": -1}))
    assert "splits.search" in message


def test_error_for_unknown_source_kind(tmp_path):
    message = error_of(tmp_path, mc_spec(source={"kind": "csv", "path": "x"}))
    assert "source" in message and "csv" in message


def test_error_for_placeholder_not_in_fields(tmp_path):
    message = error_of(tmp_path, mc_spec(prompt="{passage} {title}"))
    assert "{title}" in message and "not a known field" in message


def test_error_for_dotted_placeholder(tmp_path):
    message = error_of(tmp_path, mc_spec(prompt="{target.span1_text}"))
    assert "plain field names" in message


def test_error_for_label_field_not_mapped(tmp_path):
    message = error_of(tmp_path, mc_spec(label="gold"))
    assert "`label` names field 'gold'" in message


def test_error_for_missing_scorer_requirements(tmp_path):
    assert "needs `options`" in error_of(tmp_path, mc_spec(options=None))
    message = error_of(tmp_path, mc_spec(scorer="generate"))
    assert "needs `answers`" in message


def test_generation_options_do_not_apply_to_multiple_choice(tmp_path):
    assert "do not apply to multiple_choice" in error_of(tmp_path, mc_spec(stop=["\n"]))


def test_generation_gets_a_default_token_budget():
    spec = TaskSpec.from_dict(mc_spec(scorer="generate", options=None, label=None, answers="label"))
    assert spec.max_new_tokens == 32


def test_error_for_label_map_out_of_range(tmp_path):
    message = error_of(tmp_path, mc_spec(label_map={"true": 1, "false": 2}))
    assert "outside 0..1" in message


def test_error_for_bad_primary_metric(tmp_path):
    message = error_of(tmp_path, mc_spec(primary_metric="f1"))
    assert "primary_metric 'f1'" in message and "acc, acc_norm" in message


def test_error_for_unknown_preprocess_step(tmp_path):
    message = error_of(tmp_path, mc_spec(preprocess=["shout"]))
    assert "unknown preprocess step(s) 'shout'" in message and "wsc_mark_spans" in message


def test_error_for_preprocess_missing_inputs(tmp_path):
    message = error_of(tmp_path, mc_spec(preprocess=["wsc_mark_spans"]))
    assert "needs field(s) text, span1_index" in message


def test_error_for_per_split_source_missing_a_split(tmp_path):
    message = error_of(
        tmp_path,
        mc_spec(source={"kind": "hf", "path": "x", "split": {"search": "train", "dev": "train"}}),
    )
    assert "missing: test" in message


def test_error_for_unknown_builtin(tmp_path):
    message = error_of(tmp_path, {"name": "b", "source": {"kind": "builtin", "name": "multiply"}})
    assert "unknown built-in task 'multiply'" in message and "add" in message


def test_error_for_builtin_with_wrong_scorer(tmp_path):
    data = {"name": "b", "source": {"kind": "builtin", "name": "add"}, "scorer": "multiple_choice"}
    assert "scored by generate" in error_of(tmp_path, data)


def test_error_for_system_without_chat(tmp_path):
    assert "system" in error_of(tmp_path, mc_spec(system="Be brief."))


def test_error_for_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(TaskError, match="must be a YAML mapping"):
        TaskSpec.from_yaml(path)


def test_error_for_broken_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(TaskError, match="not valid YAML"):
        TaskSpec.from_yaml(path)


def test_compat_letter_rule_requirements(tmp_path):
    base = mc_spec(scorer="eep-compat", options=None, compat_rule="first_option")
    assert "needs `option_letters`" in error_of(tmp_path, base)
    assert "distinct capital letters" in error_of(tmp_path, {**base, "option_letters": "ab"})
    ok = TaskSpec.from_dict({**base, "option_letters": "AB", "label_map": {True: 0, 0: 1}})
    assert ok.label_map == {"true": 0, "0": 1}  # YAML keys normalised to strings


def test_eep_compat_underscore_spelling_is_accepted():
    spec = TaskSpec.from_dict(
        mc_spec(scorer="eep_compat", options=None, compat_rule="first_capital", option_letters="AB")
    )
    assert spec.scorer == "eep-compat"


def test_spec_is_frozen():
    spec = resolve_task("boolq")
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "other"
