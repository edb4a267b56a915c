"""Loaders: JSONL and Hugging Face sources, deterministic disjoint splits, few-shot, errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from eep.tasks import synthetic
from eep.tasks.example import Example
from eep.tasks.loaders import load_examples
from eep.tasks.registry import resolve_task
from eep.tasks.spec import TaskError, TaskSpec

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int) -> list[dict]:
    return [{"q": f"question {i}", "meta": {"gold": [f"answer {i}", f"alt {i}"]}} for i in range(n)]


def qa_spec(path: Path, **overrides) -> TaskSpec:
    data = {
        "name": "qa",
        "source": {"kind": "jsonl", "path": str(path)},
        "fields": {"q": "q", "gold": "meta.gold"},
        "prompt": "Q: {q}\nA:",
        "scorer": "generate",
        "answers": "gold",
        "stop": ["\n"],
        "max_new_tokens": 8,
        "splits": {"search": 4, "dev": 3, "test": 5, "seed": 7},
    }
    data.update(overrides)
    return TaskSpec.from_dict(data)


# --------------------------------------------------------------------------- JSONL


def test_jsonl_generate_examples(tmp_path):
    spec = qa_spec(write_jsonl(tmp_path / "qa.jsonl", qa_records(12)))
    search = load_examples(spec, "search")
    assert len(search) == 4
    ex = search[0]
    i = int(ex.id.rsplit(":", 1)[1]) - 1  # ids carry the 1-based line number
    assert ex.prompt == f"Q: question {i}\nA:"
    assert ex.answers == (f"answer {i}", f"alt {i}")
    assert ex.options == () and ex.label is None
    assert ex.meta["source"].endswith(f"qa.jsonl:{i + 1}")
    assert ex.meta["fields"]["gold"] == [f"answer {i}", f"alt {i}"]


def test_splits_are_deterministic_disjoint_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(12))
    spec = qa_spec(path)
    ids = {s: [e.id for e in load_examples(spec, s)] for s in ("search", "dev", "test")}
    again = {s: [e.id for e in load_examples(spec, s)] for s in ("search", "dev", "test")}
    assert ids == again
    assert [len(ids[s]) for s in ("search", "dev", "test")] == [4, 3, 5]
    every = ids["search"] + ids["dev"] + ids["test"]
    assert len(set(every)) == 12  # disjoint and together the whole pool
    other_seed = qa_spec(path, splits={"search": 4, "dev": 3, "test": 5, "seed": 8})
    assert [e.id for e in load_examples(other_seed, "search")] != ids["search"]


def test_growing_a_split_keeps_the_earlier_splits(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    small = qa_spec(path, splits={"search": 4, "dev": 3, "test": 5, "seed": 1})
    large = qa_spec(path, splits={"search": 4, "dev": 3, "test": 9, "seed": 1})
    for split in ("search", "dev"):
        assert load_examples(small, split) == load_examples(large, split)
    assert load_examples(large, "test")[:5] == load_examples(small, "test")


def test_per_split_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", qa_records(6))
    val = write_jsonl(tmp_path / "val.jsonl", [{"q": "v", "meta": {"gold": ["g"]}}] * 2)
    spec = qa_spec(
        train,
        source={
            "kind": "jsonl",
            "path": {"search": str(train), "dev": str(train), "test": str(val)},
        },
        splits={"search": 4, "dev": 2, "test": 2},
    )
    assert len(load_examples(spec, "search")) == 4 and len(load_examples(spec, "dev")) == 2
    assert {e.id.split(":")[1] for e in load_examples(spec, "test")} == {"val"}


def test_missing_jsonl_file(tmp_path):
    spec = qa_spec(tmp_path / "absent.jsonl")
    with pytest.raises(TaskError, match=r"JSONL file not found: .*absent\.jsonl"):
        load_examples(spec, "search")


def test_record_missing_a_mapped_field_names_field_file_and_line(tmp_path):
    records = qa_records(12)
    for r in records:  # every record, so whichever the shuffle selects fails
        del r["meta"]["gold"]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    with pytest.raises(TaskError) as info:
        load_examples(qa_spec(path), "search")
    message = str(info.value)
    assert "record has no field 'meta.gold'" in message and "mapped to 'gold'" in message
    assert f"{path}:" in message


def test_bad_json_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "a", "meta": {"gold": ["x"]}}\n{not json}\n')
    with pytest.raises(TaskError, match=rf"{path}:2: not valid JSON"):
        load_examples(qa_spec(path, splits={"search": 1, "dev": 1, "test": 0}), "search")


def test_split_larger_than_what_remains(tmp_path):
    spec = qa_spec(write_jsonl(tmp_path / "qa.jsonl", qa_records(10)))  # 4 + 3 + 5 > 10
    load_examples(spec, "dev")
    with pytest.raises(TaskError) as info:
        load_examples(spec, "test")
    message = str(info.value)
    assert "task 'qa'" in message and "split 'test'" in message
    assert "asks for 5 examples but only 3 remain" in message and "10 records" in message


def test_empty_split(tmp_path):
    spec = qa_spec(
        write_jsonl(tmp_path / "qa.jsonl", qa_records(10)),
        splits={"search": 4, "dev": 0, "test": 2},
    )
    with pytest.raises(TaskError, match="task 'qa': split 'dev' is empty"):
        load_examples(spec, "dev")


def test_empty_source_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(TaskError, match="has no records"):
        load_examples(qa_spec(path), "search")


def test_unknown_split_name(tmp_path):
    spec = qa_spec(write_jsonl(tmp_path / "qa.jsonl", qa_records(12)))
    with pytest.raises(TaskError, match="unknown split 'train'"):
        load_examples(spec, "train")


def test_empty_answers_need_unanswerable(tmp_path):
    records = [{"q": f"q{i}", "meta": {"gold": []}} for i in range(3)]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    splits = {"search": 1, "dev": 1, "test": 1}
    with pytest.raises(TaskError, match="holds no answer; set `unanswerable`"):
        load_examples(qa_spec(path, splits=splits), "search")
    spec = qa_spec(path, splits=splits, unanswerable="unanswerable")
    assert load_examples(spec, "search")[0].answers == ("unanswerable",)


# --------------------------------------------------------------------------- multiple choice


def test_multiple_choice_with_label_map_and_dotted_fields():
    spec = TaskSpec.from_dict(
        {
            "name": "wsc_authors",
            "source": {"kind": "jsonl", "path": str(FIXTURES / "authors_wsc.jsonl")},
            "fields": {
                "text": "text",
                "noun": "target.span1_text",
                "pronoun": "target.span2_text",
                "label": "label",
            },
            "prompt": "{text}\nDoes '{pronoun}' refer to '{noun}'?",
            "scorer": "multiple_choice",
            "options": [" yes", " no"],
            "label": "label",
            "label_map": {True: 0, False: 1},  # the file has "true"/"false" strings
            "splits": {"search": 1, "dev": 1, "test": 1},
        }
    )
    examples = [e for s in ("search", "dev", "test") for e in load_examples(spec, s)]
    by_noun = {e.meta["fields"]["noun"]: e for e in examples}
    assert by_noun["Lena"].label == 1 and by_noun["Lena"].answers == (" no",)
    assert by_noun["the baker"].label == 0 and by_noun["the baker"].options == (" yes", " no")
    assert "Does 'he' refer to 'the baker'?" in by_noun["the baker"].prompt


def test_label_not_in_label_map(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"t": "a", "y": "maybe"}] * 3)
    spec = TaskSpec.from_dict(
        {
            "name": "lm",
            "source": {"kind": "jsonl", "path": str(path)},
            "fields": {"t": "t", "y": "y"},
            "prompt": "{t}",
            "scorer": "multiple_choice",
            "options": [" a", " b"],
            "label": "y",
            "label_map": {"yes": 0, "no": 1},
            "splits": {"search": 1, "dev": 1, "test": 1},
        }
    )
    with pytest.raises(TaskError, match="label 'maybe' is not in label_map of task 'lm'"):
        load_examples(spec, "search")


def test_options_from_a_field_use_the_option_template():
    spec = TaskSpec.from_dict(
        {
            "name": "arc_local",
            "source": {"kind": "jsonl", "path": str(FIXTURES / "hf_arc.jsonl")},
            "fields": {"question": "question", "choices": "choices.text", "answer": "answerKey"},
            "prompt": "Question: {question}\nAnswer:",
            "scorer": "multiple_choice",
            "options": "choices",
            "option_template": " -> {option}",
            "label": "answer",
            "label_map": {"A": 0, "B": 1, "C": 2, "D": 3, "E": 4, "1": 0, "2": 1, "3": 2},
            "splits": {"search": 3, "dev": 0, "test": 0},
        }
    )
    by_q = {e.meta["fields"]["question"]: e for e in load_examples(spec, "search")}
    heat = by_q["Which object conducts heat best?"]
    assert heat.options[1] == " -> a copper pan" and heat.label == 1
    assert len(by_q["Which is a renewable resource?"].options) == 5
    assert by_q["What do plants take in from the air?"].label == 1  # answerKey "2"


# --------------------------------------------------------------------------- few-shot and chat


def test_few_shot_prefix_and_chat_wrapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(12))
    spec = qa_spec(
        path,
        few_shot=2,
        few_shot_separator="\n---\n",
        chat="<sys>{system}</sys>[INST]{prompt}[/INST]",
        system="Answer briefly.",
        splits={"search": 4, "dev": 3, "test": 3, "seed": 7},
    )
    examples = [e for s in ("search", "dev", "test") for e in load_examples(spec, s)]
    used = {e.id for e in examples}
    prompt = examples[0].prompt
    assert prompt.startswith("<sys>Answer briefly.</sys>[INST]Q: question ")
    assert prompt.endswith("\nA:[/INST]")
    body = prompt.removeprefix("<sys>Answer briefly.</sys>[INST]").removesuffix("[/INST]")
    *shots, question = body.split("\n---\n")
    assert len(shots) == 2
    for shot in shots:  # "Q: question i\nA: answer i", the first gold after one space
        i = shot.split("\n")[0].removeprefix("Q: question ")
        assert shot == f"Q: question {i}\nA: answer {i}"
        assert f"qa:qa:{int(i) + 1}" not in used  # shots never come from search/dev/test
    # The same shots for every example and split.
    assert all(
        e.prompt.count("\n---\n") == 2 and e.prompt.startswith(prompt[:60]) for e in examples
    )


def test_few_shot_target_template(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(6))
    spec = qa_spec(
        path,
        few_shot=1,
        few_shot_target=" {answer} (from {q})",
        splits={"search": 2, "dev": 1, "test": 1},
    )
    prompt = load_examples(spec, "search")[0].prompt
    shot = prompt.split("\n\n")[0]
    i = shot.split("\n")[0].removeprefix("Q: question ")
    assert shot == f"Q: question {i}\nA: answer {i} (from question {i})"


def test_few_shot_reservation_counts_against_the_pool(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(12))
    spec = qa_spec(path, few_shot=1)  # 4 + 3 + 5 + 1 shot > 12
    with pytest.raises(TaskError, match="1 kept for few-shot examples"):
        load_examples(spec, "test")


def test_multiple_choice_shots_end_with_the_correct_option():
    spec = TaskSpec.from_dict(
        {
            "name": "boolq_local",
            "source": {"kind": "jsonl", "path": str(FIXTURES / "hf_boolq.jsonl")},
            "fields": {"passage": "passage", "question": "question", "label": "label"},
            "prompt": "{question}?",
            "few_shot": 1,
            "scorer": "multiple_choice",
            "options": [" no", " yes"],
            "label": "label",
            "splits": {"search": 1, "dev": 1, "test": 1},
        }
    )
    shot = load_examples(spec, "search")[0].prompt.split("\n\n")[0]
    assert shot.endswith("? no") or shot.endswith("? yes")


# --------------------------------------------------------------------------- Hugging Face


def fake_load_dataset(records: list[dict], calls: list):
    def load(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(records)

    return load


def test_hf_source_calls_load_dataset_without_remote_code(monkeypatch):
    calls: list = []
    records = [json.loads(line) for line in (FIXTURES / "hf_boolq.jsonl").read_text().splitlines()]
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset(records, calls))
    spec = TaskSpec.from_dict(
        {
            "name": "boolq_hf",
            "source": {
                "kind": "hf",
                "path": "aps/super_glue",
                "name": "boolq",
                "split": "validation",
                "revision": "abc123",
            },
            "fields": {"passage": "passage", "question": "question", "label": "label"},
            "prompt": "{passage}\n{question}?",
            "scorer": "multiple_choice",
            "options": [" no", " yes"],
            "label": "label",
            "splits": {"search": 2, "dev": 1, "test": 1},
        }
    )
    examples = load_examples(spec, "search")
    assert calls == [("aps/super_glue", "boolq", {"split": "validation", "revision": "abc123"})]
    assert len(examples) == 2
    assert examples[0].id.startswith("boolq_hf:validation:")
    assert examples[0].meta["source"].startswith("hf:aps/super_glue/boolq[validation] row ")


def test_hf_load_failure_is_a_task_error(monkeypatch):
    def broken(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    spec = resolve_task("boolq")
    with pytest.raises(
        TaskError,
        match="could not load Hugging Face dataset 'aps/super_glue' config 'boolq' split 'train': hub unreachable",
    ):
        load_examples(spec, "search")


def test_hf_missing_field_names_dataset_and_row(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset([{"passage": "p"}] * 3, []))
    spec = resolve_task("boolq").model_copy(
        update={"splits": resolve_task("boolq").splits.model_copy(update={"search": 1})}
    )
    with pytest.raises(
        TaskError, match=r"hf:aps/super_glue/boolq\[train\] row \d: record has no field 'question'"
    ):
        load_examples(spec, "search")


def test_hf_json_builder_reads_local_files(monkeypatch, tmp_path):
    # The real datasets code path, offline: the packaged "json" builder on a fixture file.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    spec = TaskSpec.from_dict(
        {
            "name": "arc_json",
            "source": {
                "kind": "hf",
                "path": "json",
                "data_files": "hf_arc.jsonl",
                "split": "train",
            },
            "fields": {"question": "question", "choices": "choices.text", "answer": "answerKey"},
            "prompt": "Question: {question}\nAnswer:",
            "scorer": "multiple_choice",
            "options": "choices",
            "label": "answer",
            "label_map": {"A": 0, "B": 1, "C": 2, "D": 3, "E": 4, "1": 0, "2": 1, "3": 2},
            "splits": {"search": 3, "dev": 0, "test": 0},
        },
        base_dir=FIXTURES,  # data_files is relative to the spec's folder
    )
    assert spec.source.data_files == str(FIXTURES / "hf_arc.jsonl")
    examples = load_examples(spec, "search")
    assert sorted(e.label for e in examples) == [1, 1, 2]
    assert all(e.id.startswith("arc_json:train:") for e in examples)


# --------------------------------------------------------------------------- builtin


def test_builtin_split_uses_synthetic_make_examples():
    spec = resolve_task("add").model_copy(
        update={"splits": resolve_task("add").splits.model_copy(update={"search": 5, "seed": 3})}
    )
    got = load_examples(spec, "search")
    assert [e.prompt for e in got] == [
        e.prompt for e in synthetic.make_examples("add", "search", 5, seed=3)
    ]
    assert all(e.meta["split"] == "search" for e in got)


def test_builtin_few_shot_and_prompt_template():
    spec = TaskSpec.from_dict(
        {
            "name": "compare3",
            "source": {"kind": "builtin", "name": "compare"},
            "prompt": ">{prompt}",
            "few_shot": 2,
            "few_shot_separator": "|",
            "splits": {"search": 3, "dev": 1, "test": 1},
        }
    )
    examples = load_examples(spec, "search")
    train = synthetic.make_examples("compare", "train", 2, seed=0)
    expected_prefix = "|".join(f">{e.prompt}{e.options[e.label]}" for e in train) + "|"
    assert all(e.prompt.startswith(expected_prefix) for e in examples)
    assert examples[0].options and examples[0].label is not None


def test_builtin_errors_name_task_and_split(monkeypatch):
    def too_few(name, split, n, seed=0):
        return [Example(f"{name}-{i}", "p=", ("a",)) for i in range(2)]

    monkeypatch.setattr(synthetic, "make_examples", too_few)
    spec = TaskSpec.from_dict(
        {"name": "add", "source": {"kind": "builtin", "name": "add"}, "splits": {"search": 5}}
    )
    with pytest.raises(
        TaskError,
        match="task 'add': split 'search' asks for 5 examples but the built-in task 'add' has only 2",
    ):
        load_examples(spec, "search")

    def exhausted(name, split, n, seed=0):
        raise ValueError(f"task {name!r} split {split!r} cannot yield {n} distinct examples")

    monkeypatch.setattr(synthetic, "make_examples", exhausted)
    with pytest.raises(TaskError, match="task 'add': split 'search': .*cannot yield 5"):
        load_examples(spec, "search")
    empty = TaskSpec.from_dict(
        {"name": "add", "source": {"kind": "builtin", "name": "add"}, "splits": {"dev": 0}}
    )
    with pytest.raises(TaskError, match="split 'dev' is empty"):
        load_examples(empty, "dev")
