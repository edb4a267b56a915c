r"""TaskSpec: one evaluation task as a YAML file (source, field mapping, prompt, scorer, splits).

A spec says where the examples come from (the built-in synthetic suite, a JSONL file, or a
Hugging Face dataset), how a source record maps onto our field names, how a prompt is written from
those fields, how the model's output is scored, and how many examples the `search`, `dev` and
`test` splits take. `eep.tasks.loaders.load_examples` turns a spec and a split into `Example`s.

Field references: `fields` maps our names to source paths (`span1: target.span1_text`; dots walk
nested records, an integer segment indexes a list). Every `{placeholder}` in `prompt` and in fixed
`options`, and the `label`/`answers`/`options` field names, are our names: keys of `fields`, or
fields a `preprocess` step adds.

    name: boolq
    source: {kind: hf, path: aps/super_glue, name: boolq,
             split: {search: train, dev: train, test: validation}}
    fields: {passage: passage, question: question, label: label}
    prompt: "{passage}\nQuestion: {question}?\nAnswer:"
    scorer: multiple_choice
    options: [" no", " yes"]       # label 0 -> " no", 1 -> " yes"
    label: label
    splits: {search: 200, dev: 200, test: 500, seed: 0}
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from eep.tasks import synthetic
from eep.tasks.vocab import (  # noqa: F401  (SPLIT_NAMES is read from here too)
    LETTER_RULES,
    METRICS,
    PREPROCESSOR_FIELDS,
    SPLIT_NAMES,
    CompatRule,
    ScorerName,
    SplitName,
)

DEFAULT_MAX_NEW_TOKENS = 32  # generation budget when a generate/eep-compat spec names none


class TaskError(ValueError):
    """A task cannot be resolved, validated or loaded; the message says which and why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: str, info: ValidationInfo) -> str:
    # Relative paths in a YAML file are relative to that file, so a spec works from any cwd.
    base = (info.context or {}).get("base_dir")
    if base is None or "://" in value or Path(value).is_absolute():
        return value
    return str(Path(base) / value)


class BuiltinSource(_Frozen):
    """A task of the built-in synthetic suite (`eep.tasks.synthetic`)."""

    kind: Literal["builtin"]
    name: str

    def pool_of(self, split: str) -> str:
        """Builtin tasks generate each split separately."""
        return split


class JsonlSource(_Frozen):
    """One JSON object per line; `path` is one pool file, or one file per split."""

    kind: Literal["jsonl"]
    path: str | dict[SplitName, str]

    @field_validator("path")
    @classmethod
    def _paths(cls, value, info: ValidationInfo):
        if isinstance(value, dict):
            _require_every_split(value, "path")
            return {k: _resolve_path(v, info) for k, v in value.items()}
        return _resolve_path(value, info)

    def pool_of(self, split: str) -> str:
        """The file that `split` is sliced from."""
        return self.path[split] if isinstance(self.path, dict) else self.path


class HFSource(_Frozen):
    """A `datasets.load_dataset(path, name, split=..., revision=..., data_files=...)` call.

    `split` is one pool for all three of our splits, or one dataset split per split of ours (e.g.
    search/dev from `train`, test from `validation`). `path: json` with `data_files` reads local
    files through the same code path.
    """

    kind: Literal["hf"]
    path: str
    name: str | None = None
    split: str | dict[SplitName, str]
    revision: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None

    @field_validator("split")
    @classmethod
    def _splits(cls, value):
        if isinstance(value, dict):
            _require_every_split(value, "split")
        return value

    @field_validator("data_files")
    @classmethod
    def _data_files(cls, value, info: ValidationInfo):
        if isinstance(value, str):
            return _resolve_path(value, info)
        if isinstance(value, list):
            return [_resolve_path(v, info) for v in value]
        if isinstance(value, dict):
            return {
                k: _resolve_path(v, info)
                if isinstance(v, str)
                else [_resolve_path(x, info) for x in v]
                for k, v in value.items()
            }
        return value

    def pool_of(self, split: str) -> str:
        """The dataset split that `split` is sliced from."""
        return self.split[split] if isinstance(self.split, dict) else self.split


def _require_every_split(mapping: dict, what: str) -> None:
    missing = [s for s in SPLIT_NAMES if s not in mapping]
    if missing:
        raise ValueError(f"a per-split {what} must name every split; missing: {', '.join(missing)}")


Source = Annotated[BuiltinSource | JsonlSource | HFSource, Field(discriminator="kind")]


class Splits(_Frozen):
    """Sizes of our three splits and the seed of the shuffle they are sliced from."""

    search: int = Field(200, ge=0)
    dev: int = Field(200, ge=0)
    test: int = Field(500, ge=0)
    seed: int = 0

    def size(self, split: str) -> int:
        """Requested size of `split`."""
        return getattr(self, split)


class TaskSpec(_Frozen):
    """One task: source, field mapping, prompt, scorer and splits (see the module docstring)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    source: Source
    fields: dict[str, str] = Field(default_factory=dict)
    preprocess: tuple[str, ...] = ()

    # Prompt: str.format over our fields; few-shot examples (taken from the tail of the search
    # split's pool, never from search/dev/test) go before it; `chat` wraps the whole text.
    prompt: str | None = None
    few_shot: int = Field(0, ge=0)
    few_shot_separator: str = "\n\n"
    few_shot_target: str | None = None
    chat: str | None = None
    system: str | None = None

    scorer: ScorerName | None = None
    # multiple_choice (and the letter rules of eep-compat): label field and its mapping.
    options: list[str] | str | None = None
    option_template: str = " {option}"
    label: str | None = None
    label_map: dict[str, int] | None = None
    # generate (and the answer rules of eep-compat): gold answer field, str or list of str.
    answers: str | None = None
    unanswerable: str | None = None
    answer_extract: Literal["last_number"] | None = None
    stop: tuple[str, ...] = ()
    max_new_tokens: int | None = Field(None, ge=1)
    # eep-compat
    option_letters: str | None = None
    compat_rule: CompatRule | None = None

    primary_metric: str | None = None
    # What a search and its dev re-ranking maximise (default primary_metric); test reports primary.
    search_metric: str | None = None
    splits: Splits = Field(default_factory=Splits)

    # ------------------------------------------------------------------ normalisation

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("scorer") == "eep_compat":
            data["scorer"] = "eep-compat"
        source = data.get("source")
        kind = source.get("kind") if isinstance(source, dict) else getattr(source, "kind", None)
        if kind == "builtin":
            task = source.get("name") if isinstance(source, dict) else source.name
            if task not in synthetic.SYNTHETIC_TASKS:
                raise ValueError(
                    f"unknown built-in task {task!r}; the built-in tasks are: "
                    f"{', '.join(synthetic.SYNTHETIC_TASKS)}"
                )
            data.setdefault("scorer", synthetic.task_kind(task))
            if data["scorer"] == "generate":
                data.setdefault("max_new_tokens", synthetic.max_new_tokens(task))
        if data.get("scorer") in ("generate", "eep-compat") and data.get("max_new_tokens") is None:
            data["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        return data

    @field_validator("label_map", mode="before")
    @classmethod
    def _label_keys(cls, value):
        # YAML gives int/bool keys (`0:`, `true:`); labels are matched on their string form.
        if isinstance(value, dict):
            return {label_key(k): v for k, v in value.items()}
        return value

    @field_validator("preprocess")
    @classmethod
    def _known_steps(cls, value):
        unknown = [s for s in value if s not in PREPROCESSOR_FIELDS]
        if unknown:
            raise ValueError(
                f"unknown preprocess step(s) {', '.join(map(repr, unknown))}; "
                f"the steps are: {', '.join(PREPROCESSOR_FIELDS)}"
            )
        return value

    # ------------------------------------------------------------------ cross-field checks

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.scorer is None:
            raise ValueError("`scorer` is required: multiple_choice, generate or eep-compat")
        builtin = self.source.kind == "builtin"
        if builtin:
            self._check_builtin()
        else:
            if self.prompt is None:
                raise ValueError("`prompt` is required for jsonl and hf sources")
            self._check_fields()
        self._check_scorer()
        if self.chat is not None:
            _check_placeholders("chat", self.chat, {"prompt", "system"})
            if "{prompt}" not in self.chat:
                raise ValueError("`chat` must contain {prompt}")
        if self.system is not None and (self.chat is None or "{system}" not in self.chat):
            raise ValueError("`system` is used only through a `chat` template containing {system}")
        for key in ("primary_metric", "search_metric"):
            value = getattr(self, key)
            if value is not None and value not in METRICS[self.scorer]:
                raise ValueError(
                    f"{key} {value!r} is not a metric of the {self.scorer} "
                    f"scorer; its metrics are: {', '.join(METRICS[self.scorer])}"
                )
        return self

    def _check_builtin(self) -> None:
        for key in ("fields", "preprocess", "options", "label", "label_map", "answers"):
            if getattr(self, key):
                raise ValueError(f"`{key}` does not apply to a builtin source")
        kind = synthetic.task_kind(self.source.name)
        if self.scorer != kind:
            raise ValueError(
                f"built-in task {self.source.name!r} is scored by {kind}, not {self.scorer}"
            )
        if self.prompt is not None:
            _check_placeholders("prompt", self.prompt, {"prompt"})
        if self.few_shot_target is not None:
            _check_placeholders("few_shot_target", self.few_shot_target, {"answer"})

    def _check_fields(self) -> None:
        known = set(self.fields)
        for step in self.preprocess:
            needs, adds = PREPROCESSOR_FIELDS[step]
            missing = [f for f in needs if f not in known]
            if missing:
                raise ValueError(
                    f"preprocess step {step!r} needs field(s) {', '.join(missing)} in `fields`"
                )
            known |= set(adds)
        _check_placeholders("prompt", self.prompt, known)
        if self.few_shot_target is not None:
            _check_placeholders("few_shot_target", self.few_shot_target, known | {"answer"})
        for key in ("label", "answers"):
            ref = getattr(self, key)
            if ref is not None and ref not in known:
                raise ValueError(f"`{key}` names field {ref!r}, which is not in `fields`")
        if isinstance(self.options, str) and self.options not in known:
            raise ValueError(f"`options` names field {self.options!r}, which is not in `fields`")
        if isinstance(self.options, list):
            for i, template in enumerate(self.options):
                _check_placeholders(f"options[{i}]", template, known)
        _check_placeholders("option_template", self.option_template, {"option"})

    def _check_scorer(self) -> None:
        scorer = self.scorer
        if scorer != "eep-compat" and (self.compat_rule or self.option_letters):
            raise ValueError(
                "`compat_rule` and `option_letters` apply only to the eep-compat scorer"
            )
        if scorer != "generate" and self.answer_extract:
            raise ValueError("`answer_extract` applies only to the generate scorer")
        builtin = self.source.kind == "builtin"
        if scorer == "multiple_choice":
            if self.stop or self.max_new_tokens is not None:
                raise ValueError("`stop` and `max_new_tokens` do not apply to multiple_choice")
            if not builtin:
                self._require("options", "label")
                self._forbid("answers", "unanswerable")
                if isinstance(self.options, list):
                    if len(self.options) < 2:
                        raise ValueError("`options` needs at least two options")
                    self._check_label_map(len(self.options))
        elif scorer == "generate":
            if not builtin:
                self._require("answers")
                self._forbid("options", "label", "label_map")
        else:  # eep-compat
            if builtin:
                raise ValueError("a builtin source cannot use the eep-compat scorer")
            self._require("compat_rule")
            self._forbid("options")
            if self.compat_rule in LETTER_RULES:
                self._require("option_letters", "label")
                self._forbid("answers", "unanswerable")
                letters = self.option_letters
                if len(set(letters)) != len(letters) or not letters.isupper():
                    raise ValueError(
                        f"`option_letters` must be distinct capital letters, got {letters!r}"
                    )
                self._check_label_map(len(letters))
            else:
                self._require("answers")
                self._forbid("option_letters", "label", "label_map")

    def _require(self, *keys: str) -> None:
        missing = [k for k in keys if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"the {self._mode()} scorer needs {', '.join(f'`{k}`' for k in missing)}"
            )

    def _forbid(self, *keys: str) -> None:
        present = [k for k in keys if getattr(self, k) is not None]
        if present:
            raise ValueError(
                f"{', '.join(f'`{k}`' for k in present)} does not apply to the {self._mode()} scorer"
            )

    def _mode(self) -> str:
        return f"eep-compat ({self.compat_rule})" if self.scorer == "eep-compat" else self.scorer

    def _check_label_map(self, n: int) -> None:
        bad = {k: v for k, v in (self.label_map or {}).items() if not 0 <= v < n}
        if bad:
            raise ValueError(f"label_map maps to indices outside 0..{n - 1}: {bad}")

    # ------------------------------------------------------------------ derived

    @property
    def uses_loglikelihood(self) -> bool:
        """True when examples are scored from option log-likelihoods, not generated text."""
        return self.scorer == "multiple_choice"

    # ------------------------------------------------------------------ files

    @classmethod
    def from_yaml(cls, path: str | Path) -> TaskSpec:
        """Read and validate a spec file; errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise TaskError(f"task spec file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise TaskError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise TaskError(
                f"{path}: a task spec must be a YAML mapping, got {type(data).__name__}"
            )
        return cls.from_dict(data, origin=str(path), base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, data: dict, origin: str = "task spec", base_dir: str | Path | None = None
    ) -> TaskSpec:
        """Validate a mapping; `origin` names it in errors, `base_dir` anchors relative paths."""
        context = {"base_dir": str(base_dir)} if base_dir is not None else None
        try:
            return cls.model_validate(data, context=context)
        except ValidationError as exc:
            raise TaskError(format_validation_error(exc, origin)) from None

    def to_yaml(self) -> str:
        """The spec as YAML that `from_yaml` reads back to an equal spec."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["scorer"] = self.scorer  # explicit, even where a builtin source implies it
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def label_key(value: Any) -> str:
    """The string a label is matched on: `True`/`"true"` -> "true", `0`/`"0"` -> "0"."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).strip()


def _check_placeholders(where: str, template: str, allowed: set[str]) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"`{where}` is not a valid template ({exc}); write {{{{ and }}}} for braces"
        ) from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise ValueError(
                f"`{where}` has placeholder {{{name}}}; use plain field names (map nested source "
                f"fields in `fields`)"
            )
        if name not in allowed:
            raise ValueError(
                f"`{where}` uses {{{name}}}, which is not a known field; known: "
                f"{', '.join(sorted(allowed)) or '(none)'}"
            )


def format_validation_error(exc: ValidationError, origin: str, what: str = "task spec") -> str:
    """One line per problem: `origin: field.path: message`."""
    lines = [f"{origin}: invalid {what}"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
