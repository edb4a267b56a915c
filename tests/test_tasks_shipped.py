"""Each shipped paper spec maps real-shaped records (invented text) to the expected examples.

The hub is unreachable in tests: `datasets.load_dataset` is replaced by a fake that checks the
dataset id and config the spec asks for and returns a fixture in that dataset's record shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from eep.tasks.loaders import load_examples
from eep.tasks.registry import resolve_task
from eep.tasks.spec import TaskSpec

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"

# spec -> (hub dataset id, config, fixture file)
HUB = {
    "boolq": ("aps/super_glue", "boolq", "hf_boolq"),
    "cb": ("aps/super_glue", "cb", "hf_cb"),
    "rte": ("aps/super_glue", "rte", "hf_rte"),
    "wic": ("aps/super_glue", "wic", "hf_wic"),
    "wsc": ("aps/super_glue", "wsc.fixed", "hf_wsc"),
    "record": ("aps/super_glue", "record", "hf_record"),
    "squad": ("rajpurkar/squad_v2", "squad_v2", "hf_squad_v2"),
    "drop": ("ucinlp/drop", None, "hf_drop"),
    "gsm8k": ("openai/gsm8k", "main", "hf_gsm8k"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "hf_arc"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "hf_arc"),
    "hellaswag": ("Rowan/hellaswag", None, "hf_hellaswag"),
    "openbookqa": ("allenai/openbookqa", "main", "hf_openbookqa"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "hf_winogrande"),
}
for _task in ("boolq", "cb", "rte", "wic", "wsc", "squad"):
    HUB[f"{_task}_eep"] = HUB[_task]


def fixture(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture
def hub(monkeypatch):
    """Serve fixtures as hub datasets; records the (path, config, split) of every call."""
    calls: list[tuple] = []

    def load_dataset(path, name=None, *, split, **kwargs):
        assert "trust_remote_code" not in kwargs
        for dataset_id, config, file in HUB.values():
            if (path, name) == (dataset_id, config):
                calls.append((path, name, split))
                return datasets.Dataset.from_list(fixture(file))
        raise AssertionError(f"unexpected dataset {path!r} config {name!r}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def small(name: str, **overrides) -> TaskSpec:
    """A shipped spec with splits small enough for a fixture: 1 search, 1 dev, the test pool."""
    spec = resolve_task(name)
    _, _, file = HUB[name]
    data = spec.model_dump()
    data["splits"] = {"search": 1, "dev": 1, "test": len(fixture(file)), "seed": 0}
    data.update(overrides)
    return TaskSpec.model_validate(data)


def by_row(spec: TaskSpec) -> dict[int, object]:
    """The test split (the whole validation fixture) keyed by fixture row."""
    return {int(e.id.rsplit(":", 1)[1]): e for e in load_examples(spec, "test")}


@pytest.mark.parametrize("name", sorted(HUB))
def test_every_split_loads_from_the_declared_dataset(name, hub):
    spec = small(name, few_shot=2) if name == "gsm8k" else small(name)
    for split in ("search", "dev", "test"):
        examples = load_examples(spec, split)
        assert examples and all(e.prompt for e in examples if name != "winogrande")
        assert all(e.answers for e in examples)
    dataset_id, config, _ = HUB[name]
    assert {(p, c) for p, c, _ in hub} == {(dataset_id, config)}
    assert {s for _, _, s in hub} == set(spec.source.split.values())


def test_boolq(hub):
    rows = by_row(small("boolq"))
    assert rows[0].prompt == (
        "Kettle -- A kettle is a vessel for heating water, usually with a spout and a lid.\n"
        "Question: is a kettle a kind of pot?\nAnswer:"
    )
    assert rows[0].options == (" no", " yes")
    assert [rows[i].label for i in range(4)] == [0, 1, 0, 1]


def test_cb_rte_wic_wsc_labels(hub):
    cb = by_row(small("cb"))
    assert [cb[i].answers[0] for i in range(3)] == [" Neither", " True", " False"]
    rte = by_row(small("rte"))
    assert [rte[i].label for i in range(3)] == [0, 1, 0]
    assert rte[1].prompt.endswith("The road was never closed. True or False?\nAnswer:")
    wic = by_row(small("wic"))
    assert "Is the word 'bank' used in the same way" in wic[0].prompt
    assert [wic[i].answers[0] for i in range(3)] == [" no", " yes", " no"]
    wsc = by_row(small("wsc"))
    assert 'does the pronoun "he" refer to "the baker"?' in wsc[0].prompt
    assert [wsc[i].label for i in range(3)] == [1, 0, 1]


def test_record_cloze(hub):
    rows = by_row(small("record"))
    assert rows[0].prompt == (
        "The town of Harlow opened a new library on Monday.\n- Harlow library opens\n"
        "- Mayor Quinn cuts the ribbon\n\nResult: ____ said the library would stay open late on "
        "Fridays.\nQuestion: What entity does ____ refer to in the result?\nAnswer:"
    )
    assert rows[1].answers == ("Rivertown FC", "Rivertown")


def test_squad_and_drop_answers(hub):
    squad = by_row(small("squad"))
    assert squad[0].prompt.startswith("Title: Lighthouses\n\nBackground: The Grey Point")
    assert squad[0].prompt.endswith(
        "Question: When was the Grey Point lighthouse built?\n\nAnswer:"
    )
    assert squad[0].answers == ("1871", "in 1871")
    assert squad[1].answers == ("unanswerable",)
    drop = by_row(small("drop"))
    assert drop[0].answers == ("24",)
    assert drop[2].answers == ("the port was rebuilt", "rebuilt")


def test_gsm8k_final_answers_and_worked_shots(hub):
    spec = small("gsm8k", few_shot=2, splits={"search": 1, "dev": 1, "test": 2, "seed": 0})
    examples = load_examples(spec, "test")
    assert all(e.answers[0] in {"12", "12000", "35", "7", "120"} for e in examples)
    prompt = examples[0].prompt
    assert prompt.count("Question: ") == 3 and prompt.endswith("\nAnswer:")
    assert prompt.count("\n#### ") == 2  # each shot ends with its worked solution
    rows = by_row(small("gsm8k", few_shot=0, splits={"search": 1, "dev": 1, "test": 5, "seed": 0}))
    assert rows[1].answers == ("12000",)  # "#### 12,000" without the comma


def test_arc_and_openbookqa(hub):
    for name in ("arc_challenge", "arc_easy"):
        rows = by_row(small(name))
        assert rows[0].prompt == "Question: Which object conducts heat best?\nAnswer:"
        assert rows[0].options[1] == " a copper pan"
        assert [rows[i].label for i in range(3)] == [1, 1, 2]  # B, "2" (digit labels), C
        assert len(rows[2].options) == 5
    obqa = by_row(small("openbookqa"))
    assert obqa[0].prompt == "A magnet will attract"
    assert [obqa[i].label for i in range(3)] == [0, 1, 2]


def test_hellaswag_preprocessing(hub):
    rows = by_row(small("hellaswag"))
    assert rows[0].prompt == "Baking bread: A man kneads dough on a floured table. He"
    assert rows[0].options[2] == " sings to the oven. loudly."
    assert rows[1].prompt == "Home and Garden: How to water a fern. Check the soil. Then"
    assert [rows[i].label for i in range(3)] == [0, 1, 0]


def test_winogrande_blank(hub):
    rows = by_row(small("winogrande"))
    assert rows[0].prompt == "Nora lent her bike to Ida because"
    assert rows[0].options == (" Nora had a spare one.", " Ida had a spare one.")
    assert rows[1].label == 1 and rows[1].answers == (" the bag was too small.",)
    # A blank at the very start leaves an empty prompt: the options carry the whole sentence.
    assert rows[2].prompt == ""
    assert rows[2].options[0] == "Kim fed the dog before Sam got home, so Sam did not have to."


# --------------------------------------------------------------------------- eep-compat


def test_boolq_eep(hub):
    rows = by_row(small("boolq_eep"))
    assert rows[0].prompt == (
        "[INST]Kettle -- A kettle is a vessel for heating water, usually with a spout and a lid.\n"
        "Question: is a kettle a kind of pot\nA. Yes\nB. No\nAnswer:[/INST]"
    )
    assert rows[0].options == ()  # scored by generation
    assert [rows[i].answers[0] for i in range(4)] == ["B", "A", "B", "A"]  # hub 1 = True -> A


def test_cb_rte_wic_eep_letters(hub):
    cb = by_row(small("cb_eep"))
    assert [cb[i].answers[0] for i in range(3)] == ["C", "B", "A"]  # neutral, entailment, contra.
    assert cb[0].prompt.endswith("A. Contradiction\nB. Entailment\nC. Neutral\nAnswer:[/INST]")
    rte = by_row(small("rte_eep"))
    assert [rte[i].answers[0] for i in range(3)] == ["A", "B", "A"]
    wic = by_row(small("wic_eep"))
    assert "Are 'bank' in the above two sentenses the same?" in wic[0].prompt
    assert [wic[i].answers[0] for i in range(3)] == ["B", "A", "B"]


def test_wsc_eep_marks_spans_like_the_authors(hub):
    rows = by_row(small("wsc_eep"))
    assert rows[0].prompt == (
        "[INST]Passage: The painter thanked * the baker * because # he # had shared his bread .\n"
        "Does the pronoun # he # refer to * the baker *?\nA. Yes\nB. No\nAnswer:[/INST]"
    )
    assert rows[2].prompt.startswith("[INST]Passage: * The cat * chased the mouse until # it # was")
    assert [rows[i].answers[0] for i in range(3)] == ["A", "B", "A"]


def test_squad_eep(hub):
    rows = by_row(small("squad_eep"))
    assert rows[0].prompt.startswith("[INST]The Grey Point lighthouse was built in 1871")
    assert rows[0].prompt.endswith(
        "answer `impossible to answer`:\nQuestion: When was the Grey Point lighthouse built?"
        "[/INST]Answer:"
    )
    assert rows[1].answers == ("impossible to answer",)


@pytest.mark.parametrize("name", ["boolq_eep", "cb_eep", "rte_eep", "wsc_eep"])
def test_compat_specs_also_read_the_authors_jsonl_shape(name):
    # The authors' files have string labels and (WSC) spans nested under `target`; pointing the
    # same spec at such a file needs only a source and, for WSC, nested field paths.
    data = resolve_task(name).model_dump()
    task = name.removesuffix("_eep")
    data["source"] = {"kind": "jsonl", "path": str(FIXTURES / f"authors_{task}.jsonl")}
    data["splits"] = {"search": 1, "dev": 1, "test": 1, "seed": 0}
    if task == "wsc":
        data["fields"].update(
            {k: f"target.{k}" for k in ("span1_index", "span2_index", "span1_text", "span2_text")}
        )
    spec = TaskSpec.model_validate(data)
    examples = [e for s in ("search", "dev", "test") for e in load_examples(spec, s)]
    labels = {str(e.meta["fields"]["label"]): e.answers[0] for e in examples}
    expected = {
        "boolq": {"true": "A", "false": "B"},
        "cb": {"contradiction": "A", "entailment": "B", "neutral": "C"},
        "rte": {"entailment": "A", "not_entailment": "B"},
        "wsc": {"true": "A", "false": "B"},
    }[task]
    assert len(examples) == 3 and labels == {k: v for k, v in expected.items() if k in labels}
    if task == "wsc":
        baker = next(e for e in examples if "baker" in e.prompt)
        assert "thanked * the baker * because # he # had" in baker.prompt
