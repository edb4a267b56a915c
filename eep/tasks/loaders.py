"""Loaders: a TaskSpec and a split name in, a list of `Example`s out.

Splits of a file or dataset source are carved from a pool deterministically: the pool's records
are shuffled with `splits.seed`, then `search`, `dev` and `test` take disjoint consecutive slices
in that order (splits mapped to different pools each start at the front of their own pool).
Few-shot examples come from the far end of the search split's pool, so adding shots never moves
an example between splits. Builtin tasks call `synthetic.make_examples` once per split.

Only the records a split selects are mapped, so a malformed record elsewhere in a large dataset
does not stop a run; a selected record that lacks a mapped field is an error naming the field and
the record's place (file and line, or dataset split and row).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eep.tasks import synthetic
from eep.tasks.example import Example
from eep.tasks.spec import TaskError, TaskSpec, label_key
from eep.tasks.vocab import LETTER_RULES, PREPROCESSOR_FIELDS, SPLIT_NAMES

# --------------------------------------------------------------------------- preprocess steps
# Record-level rewrites that a str.format template cannot express. Each reads some of our fields
# and returns new/replaced ones; what each reads and writes is declared in
# `eep.tasks.vocab.PREPROCESSOR_FIELDS`, which the spec validator checks against `fields`.


@dataclass(frozen=True)
class Preprocessor:
    """A named record rewrite: the fields it reads, the fields it writes, the function."""

    needs: tuple[str, ...]
    adds: tuple[str, ...]
    fn: Callable[[dict[str, Any]], dict[str, Any]]


def _wsc_mark_spans(rec: dict[str, Any]) -> dict[str, Any]:
    # The authors' WSCDataset_V3: the noun phrase becomes "* span1 *" and the pronoun "# span2 #",
    # located by word index in the space-split text.
    words = rec["text"].split(" ")
    spans = [
        (
            int(rec["span1_index"]),
            len(str(rec["span1_text"]).split(" ")),
            f"* {rec['span1_text']} *",
        ),
        (
            int(rec["span2_index"]),
            len(str(rec["span2_text"]).split(" ")),
            f"# {rec['span2_text']} #",
        ),
    ]
    out: list[str] = []
    for i, word in enumerate(words):
        for start, length, marked in spans:
            if start <= i < start + length:
                if i == start:
                    out.append(marked)
                break
        else:
            out.append(word)
    return {"text": " ".join(out)}


def _record_cloze(rec: dict[str, Any]) -> dict[str, Any]:
    # ReCoRD passages list their summary bullets after "@highlight" lines; the query marks the
    # blank with "@placeholder".
    head, *highlights = rec["passage"].strip().split("\n@highlight\n")
    passage = head + "".join(f"\n- {h.strip()}" for h in highlights)
    return {"passage": passage, "query": rec["query"].replace("@placeholder", "____")}


def _gsm8k_final_answer(rec: dict[str, Any]) -> dict[str, Any]:
    # GSM8K answers are worked solutions ending "#### 1,234"; the gold is the number after ####.
    solution = str(rec["answer"])
    if "####" not in solution:
        raise ValueError("answer has no '####' final-answer marker")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return {"answer": final, "solution": solution}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # WikiHow markup artefacts such as "[header]"
    return text.replace("  ", " ")


def _hellaswag(rec: dict[str, Any]) -> dict[str, Any]:
    # lm-evaluation-harness' HellaSwag preprocessing.
    ctx = rec["ctx_a"] + " " + str(rec["ctx_b"]).capitalize()
    return {
        "query": _hellaswag_clean(rec["activity_label"] + ": " + ctx),
        "endings": [_hellaswag_clean(e) for e in rec["endings"]],
    }


def _winogrande_blank(rec: dict[str, Any]) -> dict[str, Any]:
    # The sentence before the blank is the prompt; each option continues it with the option
    # filled in and the rest of the sentence, so both options are scored after the same prompt.
    sentence = rec["sentence"]
    if "_" not in sentence:
        raise ValueError("sentence has no '_' blank")
    before, after = sentence.split("_", 1)
    context = before.rstrip()
    gap = before[len(context) :]
    return {
        "context": context,
        "option1_filled": gap + rec["option1"] + after,
        "option2_filled": gap + rec["option2"] + after,
    }


_STEP_FUNCTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "wsc_mark_spans": _wsc_mark_spans,
    "record_cloze": _record_cloze,
    "gsm8k_final_answer": _gsm8k_final_answer,
    "hellaswag": _hellaswag,
    "winogrande_blank": _winogrande_blank,
}
if set(_STEP_FUNCTIONS) != set(PREPROCESSOR_FIELDS):  # one list of steps, checked at import
    raise RuntimeError(
        f"eep.tasks.loaders implements steps {sorted(_STEP_FUNCTIONS)}, "
        f"eep.tasks.vocab declares {sorted(PREPROCESSOR_FIELDS)}"
    )
PREPROCESSORS: dict[str, Preprocessor] = {
    name: Preprocessor(*PREPROCESSOR_FIELDS[name], fn) for name, fn in _STEP_FUNCTIONS.items()
}


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True)
class _Row:
    """One raw source record and where it came from (for ids and error messages)."""

    record: Any
    where: str
    row: int


@dataclass(frozen=True)
class _Pool:
    """A source's records by index; only the rows a split selects are ever read."""

    name: str  # short name for example ids: the HF split or the JSONL file stem
    size: int
    get: Callable[[int], _Row]


def _read_jsonl(path: str) -> _Pool:
    file = Path(path)
    if not file.is_file():
        raise TaskError(f"JSONL file not found: {file}")
    rows: list[_Row] = []
    with file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
            rows.append(_Row(record, where, line_no))
    return _Pool(file.stem, len(rows), rows.__getitem__)


def _read_hf(source, split: str) -> _Pool:
    import datasets

    kwargs: dict[str, Any] = {"split": split}
    if source.revision is not None:
        kwargs["revision"] = source.revision
    if source.data_files is not None:
        kwargs["data_files"] = source.data_files
    # trust_remote_code is never passed: a spec must not run code from the hub.
    try:
        dataset = datasets.load_dataset(source.path, source.name, **kwargs)
    except Exception as exc:  # datasets raises many types (network, missing config, files)
        config = f" config {source.name!r}" if source.name else ""
        raise TaskError(
            f"could not load Hugging Face dataset {source.path!r}{config} split {split!r}: {exc}"
        ) from exc
    label = f"hf:{source.path}" + (f"/{source.name}" if source.name else "") + f"[{split}]"
    return _Pool(split, len(dataset), lambda i: _Row(dataset[i], f"{label} row {i}", i))


def _read_pool(spec: TaskSpec, pool: str) -> _Pool:
    if spec.source.kind == "jsonl":
        return _read_jsonl(pool)
    return _read_hf(spec.source, pool)


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


@dataclass(frozen=True)
class _Slice:
    start: int
    stop: int


def _slice_of(spec: TaskSpec, split: str, rows: _Pool) -> _Slice:
    """Where `split` sits in its shuffled pool; errors when it is empty or does not fit."""
    source, sizes = spec.source, spec.splits
    size = sizes.size(split)
    if size == 0:
        raise TaskError(f"task {spec.name!r}: split {split!r} is empty (splits.{split} is 0)")
    pool = source.pool_of(split)
    start = sum(
        sizes.size(s) for s in SPLIT_NAMES[: SPLIT_NAMES.index(split)] if source.pool_of(s) == pool
    )
    reserved = spec.few_shot if source.pool_of("search") == pool else 0
    available = max(rows.size - reserved - start, 0)
    if size > available:
        shots = f", {reserved} kept for few-shot examples" if reserved else ""
        earlier = f", {start} taken by earlier splits" if start else ""
        raise TaskError(
            f"task {spec.name!r}: split {split!r} asks for {size} examples but only {available} "
            f"remain in {rows.name!r} ({rows.size} records{earlier}{shots})"
        )
    return _Slice(start, start + size)


# --------------------------------------------------------------------------- records -> examples


def _get_path(record: Any, path: str) -> Any:
    value = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, (list, tuple))
            and part.lstrip("-").isdigit()
            and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            raise KeyError(part)
    return value


def _map_fields(spec: TaskSpec, row: _Row) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for ours, path in spec.fields.items():
        try:
            fields[ours] = _get_path(row.record, path)
        except KeyError:
            raise TaskError(
                f"{row.where}: record has no field {path!r} (mapped to {ours!r} in task {spec.name!r})"
            ) from None
    for step in spec.preprocess:
        try:
            fields.update(PREPROCESSORS[step].fn(fields))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TaskError(
                f"{row.where}: preprocess step {step!r} failed in task {spec.name!r}: {exc}"
            ) from None
    return fields


def _render(template: str, fields: dict[str, Any], where: str, what: str) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise TaskError(f"{where}: could not fill the {what} template: {exc}") from None


def _label_index(spec: TaskSpec, raw: Any, n: int, where: str) -> int:
    if spec.label_map is not None:
        key = label_key(raw)
        index = spec.label_map.get(key, spec.label_map.get(key.lower()))
        if index is None:
            raise TaskError(
                f"{where}: label {raw!r} is not in label_map of task {spec.name!r} "
                f"(keys: {', '.join(spec.label_map)})"
            )
    else:
        if isinstance(raw, bool) or not str(raw).strip().lstrip("-").isdigit():
            raise TaskError(
                f"{where}: label {raw!r} is not an option index; add a label_map to task {spec.name!r}"
            )
        index = int(str(raw).strip())
    if not 0 <= index < n:
        raise TaskError(f"{where}: label {raw!r} gives index {index}, outside 0..{n - 1}")
    return index


def _answer_list(spec: TaskSpec, fields: dict[str, Any], where: str) -> tuple[str, ...]:
    raw = fields[spec.answers]
    if isinstance(raw, (list, tuple)):
        answers = [str(a) for a in raw]
    elif raw is None:
        answers = []
    else:
        answers = [str(raw)]
    if not answers and spec.unanswerable is not None:
        answers = [spec.unanswerable]
    if not answers:
        raise TaskError(
            f"{where}: field {spec.answers!r} holds no answer; set `unanswerable` in task "
            f"{spec.name!r} if empty answers mean 'no answer'"
        )
    return tuple(dict.fromkeys(answers))  # drop duplicates, keep order


@dataclass(frozen=True)
class _Parsed:
    """A record's prompt body and gold, before few-shot and chat wrapping."""

    body: str
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    label: int | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def gold_text(self) -> str:
        return self.options[self.label] if self.options else self.answers[0]


def _parse(spec: TaskSpec, row: _Row) -> _Parsed:
    fields = _map_fields(spec, row)
    body = _render(spec.prompt, fields, row.where, "prompt")
    if spec.scorer == "multiple_choice":
        if isinstance(spec.options, str):
            values = fields[spec.options]
            if not isinstance(values, (list, tuple)) or len(values) < 2:
                raise TaskError(
                    f"{row.where}: field {spec.options!r} should hold a list of at least two options"
                )
            options = tuple(spec.option_template.format(option=v) for v in values)
        else:
            options = tuple(_render(t, fields, row.where, "option") for t in spec.options)
        label = _label_index(spec, fields[spec.label], len(options), row.where)
        return _Parsed(body, (options[label],), options, label, fields)
    if spec.scorer == "eep-compat" and spec.compat_rule in LETTER_RULES:
        letters = spec.option_letters
        label = _label_index(spec, fields[spec.label], len(letters), row.where)
        return _Parsed(body, (letters[label],), (), label, fields)
    return _Parsed(body, _answer_list(spec, fields, row.where), (), None, fields)


def _shot_text(spec: TaskSpec, shot: _Parsed) -> str:
    if spec.few_shot_target is not None:
        target = _render(
            spec.few_shot_target,
            {**shot.fields, "answer": shot.gold_text},
            "few-shot",
            "few_shot_target",
        )
    elif shot.options:
        target = shot.gold_text  # options already carry their leading space
    else:
        target = " " + shot.gold_text
    return shot.body + target


def _wrap(spec: TaskSpec, body: str, shots: list[str]) -> str:
    text = "".join(s + spec.few_shot_separator for s in shots) + body
    if spec.chat is not None:
        text = spec.chat.format(prompt=text, system=spec.system or "")
    return text


def load_examples(spec: TaskSpec, split: str) -> list[Example]:
    """The examples of `split` ("search", "dev" or "test") of a task, in a deterministic order."""
    if split not in SPLIT_NAMES:
        raise TaskError(f"unknown split {split!r}; the splits are: {', '.join(SPLIT_NAMES)}")
    if spec.source.kind == "builtin":
        return _load_builtin(spec, split)
    pool = spec.source.pool_of(split)
    rows = _read_pool(spec, pool)
    if not rows.size:
        raise TaskError(f"task {spec.name!r}: source {rows.name!r} has no records")
    order = _shuffled(rows.size, spec.splits.seed)
    where = _slice_of(spec, split, rows)
    shots: list[str] = []
    if spec.few_shot:
        shot_pool = spec.source.pool_of("search")
        shot_rows = rows if shot_pool == pool else _read_pool(spec, shot_pool)
        shot_order = order if shot_pool == pool else _shuffled(shot_rows.size, spec.splits.seed)
        if shot_rows.size < spec.few_shot:
            raise TaskError(
                f"task {spec.name!r}: few_shot asks for {spec.few_shot} examples but "
                f"{shot_rows.name!r} has {shot_rows.size} records"
            )
        # The tail of the pool, read backwards: the same shots whatever the split sizes.
        shots = [
            _shot_text(spec, _parse(spec, shot_rows.get(i)))
            for i in shot_order[::-1][: spec.few_shot]
        ]
    examples = []
    for i in order[where.start : where.stop]:
        row = rows.get(i)
        parsed = _parse(spec, row)
        examples.append(
            Example(
                id=f"{spec.name}:{rows.name}:{row.row}",
                prompt=_wrap(spec, parsed.body, shots),
                answers=parsed.answers,
                options=parsed.options,
                label=parsed.label,
                meta={
                    "task": spec.name,
                    "split": split,
                    "source": row.where,
                    "fields": parsed.fields,
                },
            )
        )
    return examples


def _load_builtin(spec: TaskSpec, split: str) -> list[Example]:
    name, size = spec.source.name, spec.splits.size(split)
    if size == 0:
        raise TaskError(f"task {spec.name!r}: split {split!r} is empty (splits.{split} is 0)")
    try:
        made = synthetic.make_examples(name, split, size, seed=spec.splits.seed)
    except ValueError as exc:
        raise TaskError(f"task {spec.name!r}: split {split!r}: {exc}") from None
    if len(made) < size:
        raise TaskError(
            f"task {spec.name!r}: split {split!r} asks for {size} examples but the built-in task "
            f"{name!r} has only {len(made)} in that split"
        )
    shots: list[str] = []
    if spec.few_shot:
        for shot in synthetic.make_examples(name, "train", spec.few_shot, seed=spec.splits.seed):
            gold = shot.options[shot.label] if shot.options else shot.answers[0]
            target = (
                spec.few_shot_target.format(answer=gold)
                if spec.few_shot_target is not None
                else gold
            )
            shots.append(_builtin_prompt(spec, shot.prompt) + target)
    return [
        dataclasses.replace(
            ex,
            prompt=_wrap(spec, _builtin_prompt(spec, ex.prompt), shots),
            meta={**ex.meta, "task": spec.name, "split": split},
        )
        for ex in made
    ]


def _builtin_prompt(spec: TaskSpec, prompt: str) -> str:
    return prompt if spec.prompt is None else spec.prompt.format(prompt=prompt)
