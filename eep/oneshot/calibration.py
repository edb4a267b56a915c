"""Calibration data for one-shot methods, and the hooks that stream each MoE layer's inputs.

A `CalibrationSpec` says where the text comes from:

| source    | text                                                                   | default packing |
|-----------|------------------------------------------------------------------------|-----------------|
| `builtin` | the synthetic tasks' `train` split, prompt + answer, tasks interleaved | one row per text |
| `task`    | one task's split (`search` by default), prompt + gold answer/option    | one row per text |
| `jsonl`   | one JSON object per line, field `text_field`                           | packed blocks   |
| `hf`      | `datasets.load_dataset(path, name, split=...)`, field `text_field`     | packed blocks   |

The first two are task-agnostic (`builtin`) and task-specific (`task`) calibration; generic
corpora (the NAEE authors use a C4 shard) come as `jsonl` or `hf`. Packed sources follow the
authors' pipeline (Lu et al. 2024, their calibration code): documents shuffled with `seed`, the first `samples` kept,
tokenized with the model's tokenizer, concatenated and cut into blocks of `max_length` tokens (the
remainder dropped). Example sources keep one example per row (right-padded, with EOS, as the
built-in model was trained), since a short example packed with others is not what the model sees.

`Calibration` holds the token ids only (a few MB even for the authors' 262k tokens); activations are
never cached. `stream_layer_calls` runs the model batch by batch with forward hooks on every MoE
layer's router and experts and hands each layer's call (inputs, router output, routed output) of
the real, non-padding tokens to a callback while the forward runs, so memory does not grow with the
calibration set.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from eep.models.families import MoELayer, moe_layers

DEFAULT_MAX_LENGTH = 2048  # the authors' max_block_size
DEFAULT_BUILTIN_SAMPLES = 256  # texts of the built-in mix when `samples` is not given
CalibrationSource = Literal["builtin", "task", "jsonl", "hf"]


class CalibrationError(ValueError):
    """A calibration spec or data source that cannot be used."""


class CalibrationSpec(BaseModel):
    """Where calibration text comes from and how it is cut into model inputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: CalibrationSource = "builtin"
    path: str | None = Field(default=None, description="jsonl file, or hf dataset path")
    name: str | None = Field(default=None, description="hf dataset config name")
    split: str | None = Field(default=None, description="hf split (train) or task split (search)")
    task: str | dict | None = Field(default=None, description="task name, YAML path or spec")
    text_field: str = "text"
    samples: int | None = Field(
        default=None, ge=1, description="documents / examples to use (None: builtin 256, else all)"
    )
    max_length: int | None = Field(default=None, ge=2, description="block or row length (tokens)")
    pack: bool | None = Field(default=None, description="concatenate into blocks (None: by source)")
    batch_size: int = Field(default=8, ge=1, description="rows per forward (one loss batch)")
    seed: int = 42

    @property
    def packs(self) -> bool:
        """Whether documents are concatenated into fixed blocks."""
        return self.pack if self.pack is not None else self.source in ("jsonl", "hf")

    def describe(self) -> str:
        """One line naming the data, for logs and candidate metadata."""
        if self.source == "builtin":
            what = "builtin synthetic mix (train split)"
        elif self.source == "task":
            task = self.task if isinstance(self.task, str) else (self.task or {}).get("name", "?")
            what = f"task {task} ({self.split or 'search'} split)"
        elif self.source == "jsonl":
            what = f"jsonl {self.path}"
        else:
            what = f"hf {self.path}" + (f"/{self.name}" if self.name else "")
            what += f" ({self.split or 'train'})"
        count = self.limit if self.limit is not None else "all"
        return f"{what}, {count} samples, {'packed' if self.packs else 'one per row'}"

    @property
    def limit(self) -> int | None:
        """Documents to take: `samples`, the built-in mix's default, or None (all)."""
        return self.samples or (DEFAULT_BUILTIN_SAMPLES if self.source == "builtin" else None)


def parse_calibration(text: str, **overrides: Any) -> CalibrationSpec:
    """A spec from a CLI string: `builtin`, `FILE.jsonl`, `FILE.yaml` or `hf:PATH[:NAME]`."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if text == "builtin":
            return CalibrationSpec(source="builtin", **overrides)
        if text.startswith("hf:"):
            path, _, name = text.removeprefix("hf:").partition(":")
            if not path:
                raise CalibrationError("hf: needs a dataset path, e.g. hf:allenai/c4:en")
            return CalibrationSpec(source="hf", path=path, name=name or None, **overrides)
        if text.endswith((".yaml", ".yml")):
            file = Path(text)
            if not file.is_file():
                raise CalibrationError(f"{file}: calibration spec not found")
            try:
                data = yaml.safe_load(file.read_bytes().decode("utf-8")) or {}
            except (UnicodeDecodeError, yaml.YAMLError) as exc:
                reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not valid YAML"
                raise CalibrationError(f"{file}: {reason}") from None
            if not isinstance(data, dict):
                raise CalibrationError(f"{file}: expected a mapping of calibration fields")
            return CalibrationSpec(**{**data, **overrides})
        if text.endswith(".jsonl") or Path(text).is_file():
            if not Path(text).is_file():
                raise CalibrationError(f"{text}: calibration file not found")
            return CalibrationSpec(source="jsonl", path=text, **overrides)
    except ValidationError as exc:
        raise CalibrationError(_spec_error(exc, f"calibration {text!r}")) from None
    raise CalibrationError(
        f"calibration {text!r}: expected builtin, a .jsonl file, a .yaml spec or hf:PATH[:NAME]"
    )


def task_calibration(task: Any, split: str = "search", **overrides: Any) -> CalibrationSpec:
    """Task-specific calibration: the examples of a task's split (search by default)."""
    if hasattr(task, "model_dump"):
        task = task.model_dump(mode="json")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return CalibrationSpec(source="task", task=task, split=split, **overrides)
    except ValidationError as exc:
        raise CalibrationError(_spec_error(exc, "task calibration")) from None


def _spec_error(exc: ValidationError, origin: str) -> str:
    """`origin: field: message` per problem, without pydantic's URLs and input dumps."""
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {msg}")
    return f"{origin}: " + "; ".join(problems)


# ----------------------------------------------------------------------------------- text


def calibration_texts(spec: CalibrationSpec) -> tuple[list[str], bool]:
    """The calibration documents in order, and whether they are task examples (get EOS)."""
    if spec.source == "builtin":
        return _builtin_texts(spec), True
    if spec.source == "task":
        return _task_texts(spec), True
    if spec.source == "jsonl":
        return _jsonl_texts(spec), False
    return _hf_texts(spec), False


def example_text(example, builtin: bool) -> str:
    """Prompt followed by the gold answer (the correct option for multiple choice)."""
    gold = example.options[example.label] if example.options else example.answers[0]
    if builtin or example.options:
        return example.prompt + gold  # synthetic prompts end in "=", options carry their space
    return example.prompt + " " + gold


def _builtin_texts(spec: CalibrationSpec) -> list[str]:
    from eep.tasks.synthetic import SYNTHETIC_TASKS, make_examples

    per_task = math.ceil(spec.limit / len(SYNTHETIC_TASKS))
    pools = [make_examples(name, "train", per_task, seed=spec.seed) for name in SYNTHETIC_TASKS]
    # Interleaved, so any prefix of the list (and every batch) mixes the tasks.
    mixed = [pool[i] for i in range(per_task) for pool in pools]
    return [example_text(ex, builtin=True) for ex in mixed[: spec.limit]]


def _task_texts(spec: CalibrationSpec) -> list[str]:
    from eep.tasks.loaders import load_examples
    from eep.tasks.registry import resolve_task

    if spec.task is None:
        raise CalibrationError("calibration source 'task' needs a task")
    task = resolve_task(spec.task)
    examples = load_examples(task, spec.split or "search")[: spec.limit]
    builtin = task.source.kind == "builtin" and task.prompt is None
    return [example_text(ex, builtin=builtin) for ex in examples]


def _jsonl_texts(spec: CalibrationSpec) -> list[str]:
    if spec.path is None:
        raise CalibrationError("calibration source 'jsonl' needs a path")
    path = Path(spec.path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    # Reservoir sampling: a seeded uniform sample of `samples` lines in one pass, holding only the
    # sample (a C4 shard does not fit comfortably in memory as a list). None: every line.
    limit = spec.limit if spec.limit is not None else float("inf")
    rng = random.Random(spec.seed)
    reservoir: list[tuple[int, str]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                if len(reservoir) < limit:
                    reservoir.append((n, line))
                else:
                    j = rng.randrange(n + 1)
                    if j < limit:
                        reservoir[j] = (n, line)
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not UTF-8 text") from None
    texts = []
    for n, line in reservoir:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{n + 1}: not JSON ({exc})") from exc
        if not isinstance(record, dict) or spec.text_field not in record:
            raise CalibrationError(f"{path}:{n + 1}: no field {spec.text_field!r}")
        texts.append(_text(record[spec.text_field], f"{path}:{n + 1}: field {spec.text_field!r}"))
    if not texts:
        raise CalibrationError(f"{path}: no records")
    return texts


def _hf_texts(spec: CalibrationSpec) -> list[str]:
    import datasets

    if spec.path is None:
        raise CalibrationError("calibration source 'hf' needs a dataset path")
    try:
        data = datasets.load_dataset(spec.path, spec.name, split=spec.split or "train")
    except Exception as exc:  # noqa: BLE001  (offline, unknown dataset, ...: datasets' own error types)
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise CalibrationError(
            f"hf:{spec.path}: cannot load the dataset ({lines[0] if lines else type(exc).__name__})"
        ) from None
    if spec.text_field not in data.column_names:
        raise CalibrationError(
            f"hf {spec.path}: no column {spec.text_field!r}; columns: {', '.join(data.column_names)}"
        )
    data = data.shuffle(seed=spec.seed)
    if spec.limit is not None:
        data = data.select(range(min(spec.limit, len(data))))
    return [_text(t, f"hf:{spec.path} row {i}: column {spec.text_field!r}") for i, t in enumerate(data[spec.text_field])]


def _text(value: Any, where: str) -> str:
    """A calibration text; null, non-text or blank values are errors (never the string 'None')."""
    if not isinstance(value, str) or not value.strip():
        raise CalibrationError(f"{where} is {value!r}; expected non-empty text")
    return value


# ----------------------------------------------------------------------------------- tokens


@dataclass
class CalibrationBatch:
    """One forward call: right-padded ids and the mask of real tokens."""

    input_ids: torch.Tensor  # [rows, T]
    attention_mask: torch.Tensor  # [rows, T]

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())


class Calibration:
    """Tokenized calibration batches (ids only); iterate to get `CalibrationBatch`es."""

    def __init__(self, batches: list[CalibrationBatch], description: str = "") -> None:
        if not batches:
            raise CalibrationError("calibration data is empty")
        self.batches = batches
        self.description = description

    def __iter__(self) -> Iterator[CalibrationBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def tokens(self) -> int:
        """Real tokens over all batches."""
        return sum(b.tokens for b in self.batches)

    @classmethod
    def build(cls, spec: CalibrationSpec, tokenizer, max_positions: int | None = None) -> Calibration:
        """Read, tokenize and batch the spec's text for a model with `max_positions` positions."""
        texts, examples = calibration_texts(spec)
        limit = min(x for x in (spec.max_length, max_positions, DEFAULT_MAX_LENGTH) if x)
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else (eos if eos is not None else 0)
        docs = []
        for text in texts:
            ids = list(tokenizer(text)["input_ids"])
            if examples and eos is not None:
                ids.append(eos)
            if ids:
                docs.append(ids)
        rows = _pack(docs, limit) if spec.packs else [ids[:limit] for ids in docs]
        batches = [
            _collate(rows[i : i + spec.batch_size], pad) for i in range(0, len(rows), spec.batch_size)
        ]
        calibration = cls(batches, spec.describe())
        return calibration

    @classmethod
    def from_ids(cls, rows: Sequence[Sequence[int]], batch_size: int = 8, pad_id: int = 0) -> Calibration:
        """Batches from token-id rows (tests, callers with their own tokenization)."""
        rows = [list(r) for r in rows if len(r)]
        return cls([_collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)])


def _pack(docs: list[list[int]], block: int) -> list[list[int]]:
    flat = [t for ids in docs for t in ids]
    if len(flat) < block:
        return [flat]  # less than one block: use what there is rather than nothing
    return [flat[i : i + block] for i in range(0, len(flat) - block + 1, block)]


def _collate(rows: list[list[int]], pad_id: int) -> CalibrationBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return CalibrationBatch(ids, mask)


def build_calibration(spec: CalibrationSpec, model: nn.Module, tokenizer) -> Calibration:
    """`Calibration.build` with the model's position limit."""
    if tokenizer is None:
        raise CalibrationError("the model has no tokenizer: calibration text cannot be tokenized")
    return Calibration.build(spec, tokenizer, getattr(model.config, "max_position_embeddings", None))


# ----------------------------------------------------------------------------------- hooks


@dataclass
class LayerCall:
    """One MoE layer's work on one calibration batch, real tokens only.

    `hidden` is the experts' input (the block input after the router's reshape), `logits` the
    router's E-wide logits, `top_k_index`/`top_k_weights` the routing the block used, `output` the
    experts' routed sum (shared experts excluded: pruning never changes them).
    """

    layer: int  # position among MoE layers
    batch: int
    hidden: torch.Tensor  # [N, d]
    logits: torch.Tensor  # [N, E]
    top_k_index: torch.Tensor  # [N, k]
    top_k_weights: torch.Tensor  # [N, k]
    output: torch.Tensor  # [N, d]
    experts: nn.Module


class _StopForward(Exception):
    """Raised by a hook to end a forward once the last layer of interest has run."""


@torch.no_grad()
def stream_layer_calls(
    model: nn.Module,
    calibration: Calibration,
    on_call: Callable[[LayerCall], None],
    layers: Sequence[int] | None = None,
    stop_after: int | None = None,
    on_batch_end: Callable[[int], None] | None = None,
    gate_override: Callable[[int, tuple], tuple] | None = None,
) -> None:
    """Run every calibration batch and hand each selected MoE layer's call to `on_call`.

    `stop_after` ends each forward after that MoE layer (progressive NAEE needs nothing later).
    `gate_override(layer, output)` may replace a router's (logits, weights, index) output: the
    forward then continues with that routing (progressive NAEE prunes earlier layers this way).
    """
    moe = moe_layers(model)
    wanted = set(range(len(moe)) if layers is None else layers)
    device = model.get_input_embeddings().weight.device
    state: dict[str, Any] = {}
    handles = []
    for i, layer in enumerate(moe):
        handles.append(layer.gate.register_forward_hook(_gate_hook(i, state, gate_override)))
        if i in wanted or i == stop_after:
            hook = _experts_hook(i, layer, state, on_call, wanted, stop_after)
            handles.append(layer.experts.register_forward_hook(hook, with_kwargs=True))
    try:
        for b, batch in enumerate(calibration):
            state["batch"] = b
            mask = batch.attention_mask.to(device)
            state["keep"] = mask.reshape(-1).bool()
            try:
                model(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            if on_batch_end is not None:
                on_batch_end(b)
    finally:
        for h in handles:
            h.remove()


def _gate_hook(i: int, state: dict, override: Callable | None):
    def hook(module, args, output):
        if override is not None:
            output = override(i, output)
        state[("logits", i)] = output[0]
        return output

    return hook


def _experts_hook(i: int, layer: MoELayer, state: dict, on_call, wanted: set[int], stop_after):
    def hook(module, args, kwargs, output):
        if i in wanted:
            named = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args, strict=False))
            named.update(kwargs)
            hidden, index, weights = named["hidden_states"], named["top_k_index"], named["top_k_weights"]
            keep = state["keep"]
            if keep.numel() != hidden.shape[0]:
                raise RuntimeError(
                    f"MoE layer {i}: {hidden.shape[0]} token rows but the batch has {keep.numel()}"
                )
            logits = state.pop(("logits", i)).reshape(hidden.shape[0], -1)
            on_call(
                LayerCall(
                    layer=i,
                    batch=state["batch"],
                    hidden=hidden[keep],
                    logits=logits[keep],
                    top_k_index=index[keep],
                    top_k_weights=weights[keep],
                    output=output.reshape(hidden.shape[0], -1)[keep],
                    experts=layer.experts,
                )
            )
        if stop_after is not None and i == stop_after:
            raise _StopForward

    return hook


# ----------------------------------------------------------------------------------- experts


def expert_output(experts: nn.Module, hidden: torch.Tensor, expert: int, weight_dtype: torch.dtype) -> torch.Tensor:
    """f_e(x) for every row of `hidden`, computed by the experts module's own code (weight 1)."""
    n = hidden.shape[0]
    index = torch.full((n, 1), expert, dtype=torch.long, device=hidden.device)
    weights = torch.ones((n, 1), dtype=weight_dtype, device=hidden.device)
    # The class's forward, not the instance's: dynamic skipping may be installed on the instance.
    return type(experts).forward(experts, hidden, index, weights)


def all_expert_outputs(experts: nn.Module, hidden: torch.Tensor, num_experts: int, weight_dtype: torch.dtype) -> torch.Tensor:
    """Every expert's output for every row: [N, E, d] (NAEE: computed once, shared by all subsets)."""
    return torch.stack(
        [expert_output(experts, hidden, e, weight_dtype) for e in range(num_experts)], dim=1
    )
