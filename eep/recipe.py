"""`eep_recipe.yaml`: what an exported checkpoint was built from, enough to rebuild it byte for byte.

The recipe names the base model, the candidate file (relative to the recipe) and its content
hash, the export settings, and, when the export ends a campaign, the resolved campaign config and
its test table. `eep export --recipe FILE --out DIR` loads the base model, checks the candidate
against the hash and writes the same files again (model card included: it is rendered from the
recipe alone).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from eep.config import ConfigError, yaml_file
from eep.tasks.spec import format_validation_error

RECIPE_FILE = "eep_recipe.yaml"
RECIPE_VERSION = 1


class RecipeError(ValueError):
    """A recipe file cannot be read, or does not match its candidate."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportSettings(_Frozen):
    """The `export_model` arguments that change the written bytes."""

    dtype: str = "auto"
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False


class ResultRow(_Frozen):
    """One method of a campaign's test table (`eep.summary.method_rows`)."""

    label: str
    row: str
    test: float | None = None
    dev: float | None = None
    search: float | None = None
    evaluations: int = 0
    chosen: bool = False

    @field_validator("test", "dev", "search", mode="before")
    @classmethod
    def _no_nan(cls, value):
        # NaN (a failed score) is written as "no score": YAML's .nan would not compare equal.
        return None if isinstance(value, float) and math.isnan(value) else value


class Results(_Frozen):
    """A campaign's task, split sizes and test table."""

    task: str
    scorer: str
    metric: str
    search_metric: str
    dev_metric: str | None = None  # when it differs from the search's (a fitness kind)
    splits: dict[str, int]
    rows: list[ResultRow]


class Recipe(_Frozen):
    """The contents of `eep_recipe.yaml` (see the module docstring)."""

    eep_recipe: Literal[1] = RECIPE_VERSION
    eep_version: str
    base_model: str
    candidate: str
    candidate_hash: str
    export: ExportSettings = ExportSettings()
    campaign: dict[str, Any] | None = None
    results: Results | None = None

    def to_yaml(self) -> str:
        """The recipe as YAML, keys in field order (so equal recipes are equal bytes)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and validate a recipe; errors name the file and the field."""
        path = Path(path)
        try:
            data = yaml_file(path, "recipe")
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a YAML mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, str(path), "recipe")) from None


def results_from_summary(summary: dict[str, Any], task: Any) -> Results:
    """The test table of a campaign's summary (rows as `method_rows` gives them) and its task."""
    from eep.summary import method_rows  # noqa: PLC0415

    rows = [
        ResultRow(
            label=r["label"],
            row=r["row"],
            test=r.get("test"),
            dev=r.get("dev"),
            search=r.get("search"),
            evaluations=int(r.get("evaluations") or 0),
            chosen=bool(r["chosen"]),
        )
        for r in method_rows(summary)
    ]
    return Results(
        task=task.name,
        scorer=task.scorer,
        metric=summary["metric"],
        search_metric=summary.get("search_metric") or summary["metric"],
        dev_metric=summary.get("dev_metric"),
        splits={"search": task.splits.search, "dev": task.splits.dev, "test": task.splits.test},
        rows=rows,
    )
