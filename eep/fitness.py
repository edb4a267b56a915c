"""The Evaluator: one model replica and one tokenized task split; `evaluate(candidate)` scores it.

Built once per worker: the model is loaded once, one `Surgery` is built on it, the split's
examples are loaded and tokenized once into length-sorted fixed batches. `evaluate(candidate)`
then applies the candidate in place (or restores the unpruned model for None), runs batched
scoring and returns a `FitnessResult` whose hits are in the split's example order.

- multiple choice: every option of an example goes into one forward (a row per prompt+option,
  left-padded so all rows end at the same column and only the last positions need logits); an
  option scores the summed log-probability of its own tokens (float32 log-softmax, float64 sum).
- generation (`generate`, `eep-compat`): greedy decoding with a KV cache, step by step; a row
  leaves the batch (and the cache) when it emits EOS, reaches a stop string or `max_new_tokens`.
- teacher-forced fitness (`fitness="likelihood"` or `"kl"`, `eep.forced`): one row per example,
  prompt + gold answer, one forward; no generation whatever the task's scorer.

With a `RejectionRule`, batches are planned in slices of a fixed random order of the examples and
`evaluate(candidate, reject_below=t)` stops after a slice when the rule's bound on the full-split
score is below t (`eep.rejection`).

Batched numbers equal one-example-at-a-time numbers up to floating-point rounding: BLAS kernels
round differently for different row counts (on the CPU, MKL's sgemm for fewer than 8 rows), so
logits differ in the last bits; a hit changes only where two options or two next tokens tie
within that rounding.
"""

from __future__ import annotations

import inspect
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from eep.candidate import Candidate
from eep.forced import (
    DEFAULT_KL_TOP,
    FITNESS_KINDS,
    FORCED_METRICS,
    Reference,
    gold_continuation,
    kl_per_row,
)
from eep.models.loading import LoadedModel, load_model
from eep.models.skipping import set_skipping, skip_thresholds_of
from eep.models.surgery import Surgery
from eep.rejection import RejectionRule
from eep.result import FitnessResult
from eep.tasks.example import Example
from eep.tasks.loaders import load_examples
from eep.tasks.registry import resolve_task
from eep.tasks.scorers import aggregate, make_scorer, split_metric
from eep.tasks.spec import DEFAULT_MAX_NEW_TOKENS, TaskSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BATCH_SIZE = 32  # rows per forward (the EEP authors' generation batch)

# One Surgery per model object: evaluators that share a replica (several splits or tasks) must
# share its cached originals, or the second would cache the first one's pruned weights.
_SURGERIES: weakref.WeakKeyDictionary[nn.Module, Surgery] = weakref.WeakKeyDictionary()


def surgery_for(model: nn.Module, originals_device: str | torch.device | None = None) -> Surgery:
    """The one `Surgery` of a model object, built on first use."""
    surgery = _SURGERIES.get(model)
    if surgery is None:
        surgery = Surgery(model, originals_device=originals_device)
        _SURGERIES[model] = surgery
    return surgery


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as the model sees it (with the tokenizer's special tokens, e.g. BOS)."""
    return list(tokenizer(prompt)["input_ids"])


def encode_choice(tokenizer, prompt: str, option: str) -> tuple[list[int], list[int]]:
    """(context ids, option ids) of one multiple-choice row, split as lm-evaluation-harness does.

    Trailing whitespace of the prompt moves to the option, the option's ids are those of
    prompt+option after the prompt's own ids (so a merge across the boundary is tokenized as in
    running text), and the context is the prompt encoded with special tokens.
    """
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, option = prompt[:-spaces], prompt[-spaces:] + option
    context = encode_prompt(tokenizer, prompt)
    bare = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + option, add_special_tokens=False)["input_ids"]
    return context, list(whole[len(bare) :])


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class _Item:
    """One example's token ids; `index` is its place in the split."""

    index: int
    prompt_ids: list[int]
    option_ids: list[list[int]] = field(default_factory=list)
    slice: int = 0  # early rejection checks after each slice

    @property
    def rows(self) -> int:
        return max(len(self.option_ids), 1)

    @property
    def length(self) -> int:
        longest = max((len(o) for o in self.option_ids), default=0)
        return len(self.prompt_ids) + longest


@dataclass
class _Batch:
    """Left-padded model inputs of a group of examples (one row per option for MC)."""

    items: list[_Item]
    input_ids: torch.Tensor  # [rows, T]
    attention_mask: torch.Tensor  # [rows, T]
    position_ids: torch.Tensor  # [rows, T]
    tokens: int  # non-pad tokens
    option_lengths: torch.Tensor | None = None  # [rows]; MC and teacher-forced rows only

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def slice(self) -> int:
        """The rejection slice of its examples (every example of a batch shares it)."""
        return self.items[0].slice


class Evaluator:
    """Scores candidates of one model on one task split (see the module docstring).

    `model` is a MODEL argument (loaded here on `device` in `dtype`) or a `LoadedModel`, used as
    it is (`device`/`dtype` then ignored); evaluators of one model object share its `Surgery`.
    `batch_size` counts rows per forward (an example's options are never split across batches);
    `max_examples` keeps the split's first N examples; `originals_device` goes to `Surgery`.
    `fitness` is "accuracy" (the task's metric for this split), "likelihood" or "kl"
    (`eep.forced`; `kl_top` tokens kept per position of the full model's distributions);
    `rejection` plans the batches in slices for `evaluate(..., reject_below=...)`.
    """

    def __init__(
        self,
        model: str | LoadedModel,
        task: str | TaskSpec,
        split: str = "search",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_examples: int | None = None,
        originals_device: str | torch.device | None = None,
        fitness: str = "accuracy",
        kl_top: int = DEFAULT_KL_TOP,
        rejection: RejectionRule | None = None,
    ):
        if fitness not in FITNESS_KINDS:
            raise ValueError(f"fitness must be one of {', '.join(FITNESS_KINDS)}, got {fitness!r}")
        if kl_top < 1:
            raise ValueError(f"kl_top must be >= 1, got {kl_top}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        # Task first: a wrong task name or file fails before a model is loaded.
        self.spec: TaskSpec = resolve_task(task)
        self.split = split
        examples = load_examples(self.spec, split)
        self.examples: list[Example] = examples[:max_examples] if max_examples else examples
        self.scorer = make_scorer(self.spec)
        self.fitness = fitness
        self.forced = fitness != "accuracy"
        self.metric = FORCED_METRICS[fitness] if self.forced else split_metric(self.spec, split)
        self.multiple_choice = self.spec.scorer == "multiple_choice"
        self.kl_top = kl_top
        self.rejection = rejection
        self._reference: dict[int, Reference] | None = None  # kl: per example, built once
        self.max_new_tokens = self.spec.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype)
        if self.loaded.tokenizer is None:
            raise ValueError(
                f"model {self.loaded.spec!r} has no tokenizer: the evaluator needs one"
            )
        self.model: nn.Module = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.surgery = surgery_for(self.model, originals_device)
        self.batch_size = batch_size
        self.device = self.model.get_input_embeddings().weight.device
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = _pad_id(self.tokenizer, self.eos_ids)
        forward_params = inspect.signature(self.model.forward).parameters
        self._keeps_logits = "logits_to_keep" in forward_params
        # Recent transformers 5 releases name the KV cache `cache` (argument and output field)
        # and log a deprecation for `past_key_values`; older 5.x releases know only that name.
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"
        self.last_outputs: list = []
        self._batches = self._plan(self._tokenize(), batch_size)

    # ------------------------------------------------------------------ facts for the search
    @property
    def num_layers(self) -> int:
        """MoE layers of the model."""
        return self.surgery.num_layers

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer of the unpruned model."""
        return self.surgery.num_experts

    @property
    def top_k(self) -> int:
        """Active experts per token of the unpruned model."""
        return self.surgery.top_k

    @property
    def batch_layout(self) -> list[list[int]]:
        """Split indices of each batch, in the order batches run (longest examples first)."""
        return [[item.index for item in batch.items] for batch in self._batches]

    def for_split(self, split: str, max_examples: int | None = None) -> Evaluator:
        """An evaluator of another split of the same task on the same model replica."""
        return Evaluator(
            self.loaded, self.spec, split, batch_size=self.batch_size, max_examples=max_examples
        )

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def evaluate(
        self, candidate: Candidate | None = None, reject_below: float | None = None
    ) -> FitnessResult:
        """Score `candidate` (None: the unpruned model) on the split; hits in example order.

        With `reject_below` (and a `RejectionRule`), scoring stops after the first slice whose
        confidence bound on the full-split score is below it; the result is then `rejected`.
        """
        start = time.perf_counter()
        if self.fitness == "kl" and self._reference is None:
            self._build_reference()  # on the unpruned model, before the candidate goes in
        if candidate is None:
            self.surgery.restore()
        else:
            self.surgery.apply(candidate)
        # NAEE dynamic skipping rides in the candidate's extra (None: removed); eep.models.skipping.
        set_skipping(self.model, skip_thresholds_of(candidate))
        checking = reject_below is not None and self.rejection is not None
        scored: dict[int, dict[str, float]] = {}  # example index -> its metrics
        outputs: list = [None] * len(self.examples)
        tokens = 0
        bound = None
        for j, (batch, (results, used)) in enumerate(self._each_batch(self._run)):
            for item, (metrics, output) in zip(batch.items, results, strict=True):
                scored[item.index] = metrics
                outputs[item.index] = output
            tokens += used
            last = j + 1 == len(self._batches)
            at_slice_end = last or self._batches[j + 1].slice != batch.slice
            if checking and at_slice_end and len(scored) < len(self.examples):
                hits = [m[self.metric] for m in scored.values()]
                bound = self.rejection.upper_bound(hits, len(self.examples))
                if bound < reject_below:
                    break
        order = sorted(scored)
        per_example = [scored[i] for i in order]
        metrics = aggregate(per_example)
        self.last_outputs = outputs
        return FitnessResult(
            score=metrics[self.metric],
            metric=self.metric,
            hits=[m[self.metric] for m in per_example],
            count=len(per_example),
            seconds=time.perf_counter() - start,
            tokens=tokens,
            metrics=metrics,
            split=self.split,
            fitness=self.fitness,
            total=len(self.examples),
            rejected=len(per_example) < len(self.examples),
            reject_below=reject_below if checking else None,
            bound=bound if checking else None,
        )

    def _each_batch(self, work: Callable[[_Batch], T]) -> Iterator[tuple[_Batch, T]]:
        """(batch, work(batch)) for every batch in order; an out-of-memory halves the batches left.

        The batch that failed runs again after re-batching (`_shrink_from`); a single example that
        does not fit raises. Batch j of the iteration is `self._batches[j]` as it stands then.
        """
        j = 0
        while j < len(self._batches):
            batch = self._batches[j]
            try:
                out = work(batch)
                failed = False
            except Exception as exc:
                if not is_out_of_memory(exc) or len(batch.items) == 1:
                    raise
                failed = True
            if failed:
                # Outside the except block: the failed batch's tensors are free by now.
                self._shrink_from(j)
                continue
            yield batch, out
            j += 1

    def _run(self, batch: _Batch) -> tuple[list[tuple[dict[str, float], object]], int]:
        """(metrics, raw output) per example of the batch, and the tokens processed."""
        if self.fitness == "likelihood":
            values, used = self._forced_loglik(batch)
            return [({"loglik": v}, v) for v in values], used
        if self.fitness == "kl":
            values, used = self._forced_kl(batch)
            return [({"neg_kl": -v}, v) for v in values], used
        if self.multiple_choice:
            outs, used = self._score_choices(batch)
        else:
            outs, used = self._generate(batch)
        examples = [self.examples[item.index] for item in batch.items]
        return [(self.scorer.score(ex, out), out) for ex, out in zip(examples, outs, strict=True)], used

    def _forced_loglik(self, batch: _Batch) -> tuple[list[float], int]:
        """Mean log-probability of each row's gold answer tokens."""
        sums = self._option_logprob_sums(batch)
        lengths = batch.option_lengths.to(sums.device).double().clamp(min=1)
        return (sums / lengths).tolist(), batch.tokens

    def _full_logits(self, batch: _Batch) -> torch.Tensor:
        return self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits

    def _forced_kl(self, batch: _Batch) -> tuple[list[float], int]:
        """KL(full || candidate) per row, against the reference built once."""
        assert self._reference is not None
        logits = self._full_logits(batch)
        refs = [self._reference[item.index] for item in batch.items]
        return kl_per_row(logits, batch.attention_mask, refs), batch.tokens

    def _build_reference(self) -> None:
        """The full model's coarsened next-token distributions of every example (once)."""
        self.surgery.restore()
        set_skipping(self.model, None)
        reference: dict[int, Reference] = {}
        for batch, logits in self._each_batch(self._full_logits):
            for row, item in enumerate(batch.items):
                reference[item.index] = Reference.of_row(
                    logits[row], batch.attention_mask[row], self.kl_top
                )
        self._reference = reference

    def _score_choices(self, batch: _Batch) -> tuple[list[list[float]], int]:
        """Summed log-probability of every option's tokens, per example of the batch."""
        sums = self._option_logprob_sums(batch).tolist()
        out, row = [], 0
        for item in batch.items:
            out.append(sums[row : row + len(item.option_ids)])
            row += len(item.option_ids)
        return out, batch.tokens

    def _option_logprob_sums(self, batch: _Batch) -> torch.Tensor:
        """Per row, the float64 sum of the log-probabilities of its option (or gold answer) tokens."""
        lengths = batch.option_lengths  # [rows]
        longest = int(lengths.max())
        width = batch.input_ids.shape[1]
        # All rows end at the last column, so the logits that predict option tokens are the
        # `longest` positions before the last one.
        kwargs = {"logits_to_keep": longest + 1} if self._keeps_logits else {}
        logits = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            **kwargs,
        ).logits
        logits = logits[:, -(longest + 1) : -1]  # [rows, longest, vocab]
        # Logits may sit on another device than the inputs (a model split over GPUs).
        targets = batch.input_ids[:, width - longest :].to(logits.device)  # [rows, longest]
        lengths = lengths.to(logits.device)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [rows, longest]
        columns = torch.arange(longest, device=picked.device)
        in_option = columns[None, :] >= (longest - lengths)[:, None]
        return torch.where(in_option, picked, 0.0).double().sum(dim=1)

    def _generate(self, batch: _Batch) -> tuple[list[str], int]:
        """Greedy continuations (decoded, without special tokens) of the batch's prompts."""
        max_new = self.max_new_tokens
        out = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
            **({"logits_to_keep": 1} if self._keeps_logits else {}),
        )
        cache = out[self._cache_name]
        logits = out.logits[:, -1]
        mask = batch.attention_mask
        next_position = batch.position_ids[:, -1:] + 1  # [active, 1]
        active = list(range(batch.rows))  # batch rows still generating, in cache order
        generated: list[list[int]] = [[] for _ in active]
        produced = 0
        while True:
            next_tokens = logits.argmax(dim=-1).to(mask.device)  # [active]
            keep = []
            for slot, (row, token) in enumerate(zip(active, next_tokens.tolist(), strict=True)):
                generated[row].append(token)
                produced += 1
                if token in self.eos_ids or len(generated[row]) >= max_new:
                    continue
                if self.spec.stop and self._reached_stop(generated[row]):
                    continue
                keep.append(slot)
            if not keep:
                break
            if len(keep) < len(active):
                # Finished rows leave the batch: later steps compute only the running ones.
                index = torch.tensor(keep, device=mask.device)
                cache.reorder_cache(index)
                mask, next_position, next_tokens = (
                    mask[index],
                    next_position[index],
                    next_tokens[index],
                )
                active = [active[slot] for slot in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(
                input_ids=next_tokens[:, None],
                attention_mask=mask,
                position_ids=next_position,
                use_cache=True,
                **{self._cache_name: cache},
            )
            logits = out.logits[:, -1]
            next_position = next_position + 1
        texts = [self._decode(ids) for ids in generated]
        return texts, batch.tokens + produced

    def _decode(self, ids: Sequence[int]) -> str:
        cut = next((i for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        return self.tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)

    def _reached_stop(self, ids: Sequence[int]) -> bool:
        text = self._decode(ids)
        return any(s and s in text for s in self.spec.stop)

    # ------------------------------------------------------------------ batches
    def _tokenize(self) -> list[_Item]:
        """Every example's ids, prompts cut from the left to fit the model's positions."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        items, truncated = [], 0
        for index, ex in enumerate(self.examples):
            if self.forced:
                context, gold = encode_choice(self.tokenizer, ex.prompt, gold_continuation(ex))
                options = [gold]
                room = None if limit is None else limit - len(gold)
            elif self.multiple_choice:
                pairs = [encode_choice(self.tokenizer, ex.prompt, opt) for opt in ex.options]
                context = pairs[0][0]
                options = [ids for _, ids in pairs]
                room = None if limit is None else limit - max(len(o) for o in options)
            else:
                context, options = encode_prompt(self.tokenizer, ex.prompt), []
                room = None if limit is None else limit - self.max_new_tokens
            if not context:
                # A model needs one token to predict the first one from (lm-eval uses EOS).
                context = [self.pad_id if not self.eos_ids else min(self.eos_ids)]
            if room is not None and len(context) > room:
                if room < 1:
                    raise ValueError(
                        f"example {ex.id!r}: options or max_new_tokens need more than the model's "
                        f"{limit} positions"
                    )
                context, truncated = context[-room:], truncated + 1
            items.append(_Item(index, context, options))
        if self.rejection is not None:
            # Slices of a fixed random order: the examples scored first are a random sample.
            order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
            for position, index in enumerate(order):
                items[index].slice = self.rejection.slice_of(position)
        if truncated:
            log.warning(
                "%d of %d prompts cut from the left to fit %d positions",
                truncated,
                len(items),
                limit,
            )
        return items

    def _plan(self, items: list[_Item], batch_size: int) -> list[_Batch]:
        """Fixed batches, longest examples first within a slice (an out-of-memory shows early)."""
        ordered = sorted(items, key=lambda it: (it.slice, -it.length, it.index))
        groups: list[list[_Item]] = []
        rows = 0
        for item in ordered:
            # An example's options stay together; a batch holds at least one example and
            # never spans two rejection slices.
            if groups and rows + item.rows <= batch_size and groups[-1][0].slice == item.slice:
                groups[-1].append(item)
                rows += item.rows
            else:
                groups.append([item])
                rows = item.rows
        return [self._collate(group) for group in groups]

    def _collate(self, items: list[_Item]) -> _Batch:
        with_options = self.multiple_choice or self.forced
        rows = (
            [it.prompt_ids + opt for it in items for opt in it.option_ids]
            if with_options
            else [it.prompt_ids for it in items]
        )
        input_ids, attention_mask, position_ids = left_padded(rows, self.pad_id)
        option_lengths = None
        if with_options:
            option_lengths = torch.tensor(
                [len(opt) for it in items for opt in it.option_ids], device=self.device
            )
        return _Batch(
            items=items,
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            tokens=sum(len(r) for r in rows),
            option_lengths=option_lengths,
        )

    def _shrink_from(self, j: int) -> None:
        """Halve the batch size and re-batch batch `j` and every later one (earlier ones ran)."""
        self.batch_size = max(1, self.batch_size // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("batch size halved to %d after out-of-memory", self.batch_size)
        rest = [item for batch in self._batches[j:] for item in batch.items]
        self._batches = self._batches[:j] + self._plan(rest, self.batch_size)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows as left-padded (input_ids, attention_mask, position_ids), on the CPU.

    Positions count real tokens only, so a left-padded row sees the positions it would alone.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _pad_id(tokenizer, eos_ids: frozenset[int]) -> int:
    # Pad columns are masked out, so any id works; the tokenizer's own keeps inputs readable.
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_ids) if eos_ids else 0
