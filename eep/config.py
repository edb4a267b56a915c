"""Campaign YAML: one frozen pydantic model, validated with errors naming the file and field.

    name: tiny-add
    model: builtin:tiny-moe
    task: add                  # a built-in/shipped task name, a task YAML path, or an inline spec
    keep: 4                    # experts kept per MoE layer
    keep_min: null             # with keep_min/keep_max (or keep_total): a global budget of
    keep_max: null             #   keep x layers experts, each layer keeping keep_min..keep_max
    top_k: null                # active experts per token (null: the model's)
    router_mapping: probs      # probs (the EEP authors') | logits
    strategy: {kind: eep, total_iter: 150, ...}   # eep | random | coordinate_descent
    budget: {max_evaluations: null, max_seconds: null}
    workers: 0                 # 0: evaluate in this process; N > 0: N Ray actors
    seed: 0
    output: {run_dir: runs/tiny-add, export: true}

`keep`, `top_k`, `router_mapping` and `groups` are campaign-level and flow into the strategy's
settings; writing them inside `strategy:` too is an error (one place for each fact). The same for
the dev re-ranking size, `final.dev_top`, for every strategy: an older file's `strategy.dev_top`
(EEP had its own) is moved there, and one that disagrees with `final.dev_top` is an error.
`strategy.kind` is any registered strategy (`eep.search.registry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eep.search.registry import StrategySettings
from eep.tasks.registry import resolve_task
from eep.tasks.spec import TaskError, TaskSpec, format_validation_error

_SHARED_SEARCH_FIELDS = ("keep", "keep_total", "keep_min", "keep_max", "top_k", "router_mapping", "groups")


class ConfigError(ValueError):
    """A campaign file or override that does not validate; the message names file and field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Frozen):
    """Caps on top of the strategy's own iteration count (whichever ends first)."""

    max_evaluations: int | None = Field(default=None, ge=1, description="search evaluations")
    max_examples: int | None = Field(
        default=None, ge=1, description="search-split examples scored (early rejection scores fewer)"
    )
    max_seconds: float | None = Field(default=None, gt=0, description="search wall time")


class RejectionSettings(_Frozen):
    """Early rejection (eep.rejection): stop scoring a candidate that cannot matter."""

    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="one-sided bound level")
    slice: int = Field(default=16, ge=2, description="examples scored between two checks")


class FitnessSettings(_Frozen):
    """What the search maximises on the search split (dev and test always use the task's metric)."""

    kind: Literal["accuracy", "likelihood", "kl"] = Field(
        default="accuracy",
        description="accuracy: the task's search metric; likelihood: teacher-forced log-probability "
        "of the gold answer; kl: minus the KL divergence from the full model (eep.forced)",
    )
    kl_top: int = Field(default=64, ge=1, description="kl: tokens kept per position of the full model")
    early_rejection: RejectionSettings | None = Field(
        default=None, description="null: every candidate is scored on the whole split"
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, data: Any) -> Any:
        # `fitness: likelihood` is short for `fitness: {kind: likelihood}`.
        return {"kind": data} if isinstance(data, str) else data


class PolishSettings(_Frozen):
    """Gradient polishing of a candidate's R and M coefficients (eep.polish), experts frozen."""

    steps: int = Field(default=200, ge=1, description="optimizer steps (Adam)")
    lr: float = Field(default=0.01, gt=0, description="Adam learning rate on the coefficients")
    batch_size: int = Field(default=16, ge=1, description="rows (prompt + gold answer) per step")
    tune: list[Literal["merge", "router"]] = Field(
        default=["merge", "router"], min_length=1,
        description="which coefficients move: merge (M), router (R)",
    )
    kl_top: int = Field(default=64, ge=1, description="tokens kept per position of the full model")
    max_seconds: float | None = Field(default=None, gt=0, description="stop polishing after this")
    seed: int = Field(default=0, description="row order of the steps")


class Resources(_Frozen):
    """What one evaluation worker (one model replica) asks of the cluster."""

    num_gpus: float = Field(default=0, ge=0, description="GPUs per replica (several: device_map)")
    num_cpus: float = Field(default=1, ge=0, description="CPUs per replica")
    memory_gb: float | None = Field(default=None, gt=0, description="host memory per replica")


class EvaluationSettings(_Frozen):
    """How candidates are scored."""

    device: str = Field(default="auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    dtype: str = Field(default="auto", description="auto (as stored), float32, bfloat16, float16")
    batch_size: int = Field(default=32, ge=1)
    originals_on_cpu: bool = Field(
        default=False, description="keep cached original experts in host memory (GPU too small)"
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads per worker")


class FinalSettings(_Frozen):
    """The end of a campaign: dev re-ranking, test report, baselines."""

    dev_top: int = Field(default=20, ge=1, description="top candidates by search score re-scored on dev")
    random_baselines: int = Field(
        default=5, ge=0, description="random pure-pruning candidates scored on test (mean reported)"
    )


class OutputSettings(_Frozen):
    """Where a campaign writes."""

    run_dir: str | None = Field(default=None, description="default: runs/<name>")
    export: bool = Field(default=True, description="export the chosen candidate as a checkpoint")
    checkpoint_every: int = Field(default=10, ge=1, description="strategy checkpoint period (evaluations)")


class CampaignConfig(_Frozen):
    """A whole campaign: what to prune, how to score, how to search, where to write."""

    name: str = Field(default="campaign", pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    trust_remote_code: bool = False
    task: TaskSpec
    keep: int | None = Field(default=None, ge=1, description="experts kept per MoE layer (or the mean)")
    keep_total: int | None = Field(default=None, ge=1, description="global budget: experts over all layers")
    keep_min: int | None = Field(default=None, ge=1, description="global budget: fewest experts per layer")
    keep_max: int | None = Field(default=None, ge=1, description="global budget: most experts per layer")
    top_k: int | None = Field(default=None, ge=1)
    router_mapping: Literal["probs", "logits"] = "probs"
    groups: Any = "per_layer"
    strategy: StrategySettings
    init_from: list[str] = Field(
        default_factory=list,
        description="seeds of the search: candidate files, or one-shot method names (naee, "
        "frequency, soft_activation, reap, random) run on the task's search split first",
    )
    fitness: FitnessSettings = FitnessSettings()
    polish: PolishSettings | None = Field(
        default=None, description="null: no polishing; else polish the chosen candidate (eep.polish)"
    )
    budget: Budget = Budget()
    workers: int = Field(default=0, ge=0, description="0: in-process; N: N Ray actors")
    ray_address: str | None = Field(default=None, description="Ray cluster address (auto in a job)")
    max_worker_restarts: int | None = Field(
        default=None, ge=0,
        description="dead Ray workers replaced before going on with fewer (default 3 per worker)",
    )
    resources: Resources = Resources()
    evaluation: EvaluationSettings = EvaluationSettings()
    final: FinalSettings = FinalSettings()
    seed: int = 0
    output: OutputSettings = OutputSettings()

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, value: Any) -> TaskSpec:
        try:
            return resolve_task(value)
        except TaskError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("polish", mode="before")
    @classmethod
    def _polish_switch(cls, value: Any) -> Any:
        # `polish: true` is short for the defaults, `polish: false` for none.
        return {} if value is True else None if value is False else value

    @model_validator(mode="before")
    @classmethod
    def _share_search_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        strategy = data.get("strategy", {"kind": "eep"})
        if isinstance(strategy, str):
            strategy = {"kind": strategy}
        if isinstance(strategy, dict):
            strategy = dict(strategy)
            if "dev_top" in strategy:
                data = _move_dev_top(data, strategy.pop("dev_top"))
            for key in _SHARED_SEARCH_FIELDS:
                if key in strategy and key in data and strategy[key] != data[key]:
                    raise ValueError(
                        f"strategy.{key} and {key} disagree; set {key} once, at the top level"
                    )
                if key in data:
                    strategy[key] = data[key]
            data = {**data, "strategy": strategy}
        return data

    @model_validator(mode="after")
    def _one_search_score(self) -> CampaignConfig:
        if self.fitness.kind != "accuracy" and self.task.search_metric is not None:
            raise ValueError(
                f"fitness.kind {self.fitness.kind!r} and task.search_metric "
                f"{self.task.search_metric!r} both say what the search maximises; keep one"
            )
        return self

    @property
    def run_dir(self) -> Path:
        """The run directory (output.run_dir or runs/<name>)."""
        return Path(self.output.run_dir or f"runs/{self.name}")

    def to_yaml(self) -> str:
        """The resolved config as YAML (every default filled in); loads back to an equal config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _move_dev_top(data: dict, dev_top: Any) -> dict:
    # Older files (and run directories) carry EEP's own `strategy.dev_top`; it now lives in
    # `final.dev_top`, the one size every strategy's dev re-ranking uses.
    final = data.get("final")
    given = final.get("dev_top") if isinstance(final, dict) else getattr(final, "dev_top", None)
    if given is not None and given != dev_top:
        raise ValueError(
            f"strategy.dev_top ({dev_top}) and final.dev_top ({given}) disagree; the dev "
            f"re-ranking size is final.dev_top: remove strategy.dev_top"
        )
    if isinstance(final, FinalSettings):
        final = final.model_dump()
    return {**data, "final": {**(final or {}), "dev_top": dev_top}}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CampaignConfig:
    """Read a campaign YAML, apply `a.b=value` overrides, validate; errors name file and field."""
    path = Path(path)
    data = yaml_file(path, "campaign file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = _resolve_relative_task(data, path.parent)
    for item in overrides:
        data = apply_override(data, item)
    return config_from_dict(data, origin=str(path))


def yaml_file(path: Path, what: str) -> Any:
    """A YAML file's content; errors (missing, a folder, unreadable, not UTF-8, bad YAML) name it."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def config_from_dict(data: dict, origin: str = "campaign config") -> CampaignConfig:
    """Validate a campaign mapping; errors say `origin` and the field path."""
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # keep/top_k/... flow into strategy too: one mistake, reported once (at the top level).
        top = {e["loc"][0] for e in errors if len(e["loc"]) == 1}
        errors = [e for e in errors if not (len(e["loc"]) == 2 and e["loc"][0] == "strategy"
                                             and e["loc"][1] in _SHARED_SEARCH_FIELDS and e["loc"][1] in top)]
        if len(errors) == 1:  # the usual case: one line, like every other CLI error
            loc = ".".join(str(p) for p in errors[0]["loc"]) or "(top level)"
            msg = errors[0]["msg"].removeprefix("Value error, ")
            msg = "unknown field" if errors[0]["type"] == "extra_forbidden" else msg
            raise ConfigError(f"{origin}: invalid campaign config: {loc}: {msg}") from None
        raise ConfigError(format_validation_error(exc, origin, "campaign config")) from None


def apply_override(data: dict, item: str) -> dict:
    """`a.b.c=value` (value parsed as YAML) set into a copy of `data`."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. strategy.total_iter=50")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty field name in {key!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    out = dict(data)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        elif isinstance(child, str) and part == "strategy":
            child = {"kind": child}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return out


def _resolve_relative_task(data: dict, base: Path) -> dict:
    # A task given as a relative YAML path is relative to the campaign file, not the cwd.
    task = data.get("task")
    if isinstance(task, str) and task.endswith((".yaml", ".yml")) and not Path(task).is_absolute():
        candidate = base / task
        if candidate.is_file():
            return {**data, "task": str(candidate)}
    return data


# Fields a resumed campaign may change: how and how long it runs, not what it searches.
RESUMABLE_CHANGES = (
    "budget", "workers", "resources", "ray_address", "max_worker_restarts", "output",
    "evaluation.device", "evaluation.threads", "evaluation.batch_size", "evaluation.originals_on_cpu",
)


def config_changes(old: CampaignConfig, new: CampaignConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted field path -> (old value, new value) for every leaf that differs."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            out[prefix.rstrip(".")] = (a, b)

    walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    return out


def resumed_config(stored: CampaignConfig, given: CampaignConfig, origin: str) -> CampaignConfig:
    """`stored` with the run-time changes of `given`; a change that alters the search is an error."""
    changes = config_changes(stored, given)
    # The strategy settings repeat keep/top_k/...: report those once, at the top level.
    refused = sorted(
        k for k in changes
        if not k.startswith(tuple(f"{p}." for p in RESUMABLE_CHANGES) + RESUMABLE_CHANGES)
        and not (k.startswith("strategy.") and k.removeprefix("strategy.") in _SHARED_SEARCH_FIELDS)
    )
    if refused:
        shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused)
        raise ConfigError(
            f"{origin}: the given config changes what the search does: {shown}; a resumed run keeps "
            "its own settings (only budget, workers, resources, evaluation device/threads/batch "
            "size and output may change); start a new --run-dir instead"
        )
    if not changes:
        return stored
    data = stored.model_dump(mode="json")
    for key in changes:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = changes[key][1]
    return config_from_dict(data, origin=origin)
