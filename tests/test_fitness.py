"""The Evaluator against a naive one-example-at-a-time loop: equal hits, order, OOM back-off."""

from __future__ import annotations

import json
import logging
import random
import string

import pytest
import torch

from eep.builtin.tokenizer import build_tokenizer
from eep.candidate import Candidate
from eep.fitness import Evaluator, encode_choice, encode_prompt, surgery_for
from eep.models.loading import BUILTIN_MODELS, LoadedModel, load_model
from eep.models.testing import tiny_model
from eep.tasks.scorers import score_generation, score_multiple_choice, truncate_at_stop

N_EXAMPLES = 24


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """The shipped tiny MoE when it is there (real hits), else a tiny random one."""
    if (BUILTIN_MODELS["tiny-moe"] / "config.json").is_file():
        return load_model("builtin:tiny-moe")
    tokenizer = build_tokenizer()
    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    return LoadedModel(model=model, tokenizer=tokenizer, path="", spec="tiny-random")


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> dict:
    """A multiple-choice JSONL task with prompts and options of many lengths."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tasks") / "mc.jsonl"

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(lo, hi)))

    with path.open("w") as f:
        for _ in range(N_EXAMPLES):
            # Some prompts end with a space: it must move to the options (lm-eval's split).
            prompt = " ".join(word(2, 6) for _ in range(rng.randint(1, 5))) + rng.choice(["=", " "])
            choices = [word(1, 7) for _ in range(rng.randint(2, 4))]
            record = {"q": prompt, "choices": choices, "label": rng.randrange(len(choices))}
            f.write(json.dumps(record) + "\n")
    return {
        "name": "mc_fixture",
        "source": {"kind": "jsonl", "path": str(path)},
        "fields": {"q": "q", "choices": "choices", "label": "label"},
        "prompt": "{q}",
        "scorer": "multiple_choice",
        "options": "choices",
        "label": "label",
        "splits": {"search": N_EXAMPLES, "dev": 0, "test": 0},
    }


@pytest.fixture(scope="module")
def stop_task(tmp_path_factory) -> dict:
    """A generation task whose stop strings end most rows early, at different steps."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("tasks") / "gen.jsonl"
    with path.open("w") as f:
        for _ in range(N_EXAMPLES):
            prompt = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 12))) + "="
            f.write(json.dumps({"q": prompt, "a": rng.choice(string.ascii_lowercase)}) + "\n")
    return {
        "name": "stop_fixture",
        "source": {"kind": "jsonl", "path": str(path)},
        "fields": {"q": "q", "a": "a"},
        "prompt": "{q}",
        "scorer": "generate",
        "answers": "a",
        "stop": ["e", "t", "1"],
        "max_new_tokens": 10,
        "splits": {"search": N_EXAMPLES, "dev": 0, "test": 0},
    }


def merging_candidate(ev: Evaluator, seed: int = 0) -> Candidate:
    """Keep 4 with non-one-hot rows: merged experts and a probability-mapped router."""
    gen = torch.Generator().manual_seed(seed)
    base = Candidate.random_pruning(ev.num_layers, ev.num_experts, keep=4, generator=gen)
    noise = [0.05 * torch.randn(m.shape, generator=gen) for m in base.expert_merge]
    return Candidate(
        router_map=[r + n for r, n in zip(base.router_map, noise, strict=True)],
        expert_merge=[m + n.flip(0) for m, n in zip(base.expert_merge, noise, strict=True)],
        num_experts=ev.num_experts,
    )


def candidates(ev: Evaluator) -> dict[str, Candidate | None]:
    """The unpruned model, a pure pruning, and a merge."""
    return {
        "none": None,
        "prune": Candidate.random_pruning(ev.num_layers, ev.num_experts, keep=4, generator=3),
        "merge": merging_candidate(ev),
    }


# ----------------------------------------------------------------------------- naive references


@torch.inference_mode()
def naive_choices(ev: Evaluator) -> list[list[float]]:
    """Each option of each example alone through the model, no padding, no batching."""
    out = []
    for ex in ev.examples:
        logliks = []
        for option in ex.options:
            context, cont = encode_choice(ev.tokenizer, ex.prompt, option)
            ids = torch.tensor([context + cont])
            logprobs = torch.log_softmax(ev.model(input_ids=ids).logits[0].float(), dim=-1)
            at = torch.arange(len(context) - 1, len(context) - 1 + len(cont))
            logliks.append(logprobs[at, torch.tensor(cont)].double().sum().item())
        out.append(logliks)
    return out


@torch.inference_mode()
def naive_generations(ev: Evaluator) -> list[str]:
    """`model.generate` one example at a time (greedy), decoded up to the first EOS."""
    eos = ev.tokenizer.eos_token_id
    out = []
    for ex in ev.examples:
        ids = torch.tensor([encode_prompt(ev.tokenizer, ex.prompt)])
        new = ev.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=ev.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=ev.tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        new = new[: new.index(eos)] if eos in new else new
        out.append(ev.tokenizer.decode(new, skip_special_tokens=True))
    return out


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("which", ["none", "prune", "merge"])
def test_multiple_choice_equals_naive_loop(loaded, mc_task, which):
    ev = Evaluator(loaded, mc_task, batch_size=8)
    candidate = candidates(ev)[which]
    result = ev.evaluate(candidate)
    reference = naive_choices(ev)  # the surgery still holds `candidate`
    expected = [
        score_multiple_choice(ev.spec, ex, ll)["acc"]
        for ex, ll in zip(ev.examples, reference, strict=True)
    ]
    assert result.hits == expected
    assert 0 < sum(expected) < len(expected)  # both outcomes occur: the comparison means something
    for got, want in zip(ev.last_outputs, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("which", ["none", "merge"])
def test_generation_equals_naive_loop(loaded, which):
    ev = Evaluator(loaded, "reverse", batch_size=8, max_examples=N_EXAMPLES)
    result = ev.evaluate(candidates(ev)[which])
    reference = naive_generations(ev)
    assert ev.last_outputs == reference
    assert result.hits == [
        score_generation(ev.spec, ex, text)["exact_match"]
        for ex, text in zip(ev.examples, reference, strict=True)
    ]


def test_stop_strings_end_rows_early_with_the_same_scores(loaded, stop_task):
    ev = Evaluator(loaded, stop_task, batch_size=8)
    result = ev.evaluate(None)
    reference = naive_generations(ev)  # runs to EOS / max_new_tokens, no stop strings
    stop = ev.spec.stop
    assert [truncate_at_stop(t, stop) for t in ev.last_outputs] == [
        truncate_at_stop(t, stop) for t in reference
    ]
    # Rows did stop early: shorter than the reference wherever a stop string came first.
    assert sum(len(a) < len(b) for a, b in zip(ev.last_outputs, reference, strict=True)) > 0
    assert result.hits == [
        score_generation(ev.spec, ex, t)["exact_match"]
        for ex, t in zip(ev.examples, reference, strict=True)
    ]


# ----------------------------------------------------------------------------- batching and order


def test_batches_run_longest_first_but_hits_keep_split_order(loaded, mc_task):
    ev = Evaluator(loaded, mc_task, batch_size=8)
    layout = ev.batch_layout
    flat = [i for batch in layout for i in batch]
    assert sorted(flat) == list(range(N_EXAMPLES)) and flat != sorted(flat)
    lengths = [
        max(
            len(c) + len(o)
            for c, o in (encode_choice(ev.tokenizer, ex.prompt, opt) for opt in ex.options)
        )
        for ex in ev.examples
    ]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    rows = [sum(len(ev.examples[i].options) for i in batch) for batch in layout]
    assert max(rows) <= 8  # options of an example stay in one batch, within batch_size rows
    # One example per batch gives the same hits in the same (split) order.
    single = Evaluator(loaded, mc_task, batch_size=1)
    assert single.evaluate(None).hits == ev.evaluate(None).hits


def test_result_fields_and_token_counts(loaded, mc_task):
    ev = Evaluator(loaded, mc_task, batch_size=8)
    result = ev.evaluate(None)
    assert result.metric == "acc" and set(result.metrics) == {"acc", "acc_norm", "label_prob"}
    assert result.score == result.metrics["acc"] == sum(result.hits) / N_EXAMPLES
    assert result.split == "search" and result.count == N_EXAMPLES and not result.failed
    rows = [encode_choice(ev.tokenizer, ex.prompt, opt) for ex in ev.examples for opt in ex.options]
    assert result.tokens == sum(len(c) + len(o) for c, o in rows)
    assert result.seconds > 0 and result.tokens_per_second > 0

    gen = Evaluator(loaded, "reverse", batch_size=8, max_examples=8)
    result = gen.evaluate(None)
    assert result.metric == "exact_match" and set(result.metrics) == {"exact_match", "f1", "char_similarity"}
    prompts = sum(len(encode_prompt(gen.tokenizer, ex.prompt)) for ex in gen.examples)
    generated = result.tokens - prompts
    # Each row produced its text's tokens (one per character here) plus EOS when it stopped early.
    assert sum(len(t) for t in gen.last_outputs) <= generated <= 8 * gen.max_new_tokens


def test_search_and_dev_read_the_search_metric_test_the_primary(loaded):
    task = {"name": "reverse", "source": {"kind": "builtin", "name": "reverse"},
            "search_metric": "char_similarity", "max_new_tokens": 6}
    search = Evaluator(loaded, task, batch_size=8, max_examples=8)
    dev, test = search.for_split("dev", max_examples=8), search.for_split("test", max_examples=8)
    for ev, metric in ((search, "char_similarity"), (dev, "char_similarity"), (test, "exact_match")):
        result = ev.evaluate(None)
        assert result.metric == metric and result.score == result.metrics[metric]
        assert result.hits == [
            score_generation(ev.spec, ex, text)[metric]
            for ex, text in zip(ev.examples, ev.last_outputs, strict=True)
        ]


def test_candidate_then_none_restores_original_scores(loaded, mc_task):
    ev = Evaluator(loaded, mc_task, batch_size=8)
    before = ev.evaluate(None)
    outputs = ev.last_outputs
    ev.evaluate(candidates(ev)["prune"])
    assert ev.last_outputs != outputs  # pruning changed the log-likelihoods (hits may agree by chance)
    after = ev.evaluate(None)
    assert after.hits == before.hits and ev.last_outputs == outputs  # bit for bit


def test_evaluators_on_one_replica_share_its_surgery(loaded, mc_task):
    search = Evaluator(loaded, mc_task, batch_size=8)
    other = Evaluator(loaded, "reverse", max_examples=4)
    dev = Evaluator(loaded, "reverse", split="dev", max_examples=4)
    assert search.surgery is other.surgery is surgery_for(loaded.model)
    assert dev.for_split("test", max_examples=2).surgery is search.surgery
    # A pruned model left behind by one evaluator does not leak into the next one's baseline.
    baseline = search.evaluate(None).hits
    other.evaluate(candidates(other)["prune"])
    assert search.evaluate(None).hits == baseline
    assert (search.num_layers, search.num_experts, search.top_k) == (
        search.surgery.num_layers,
        loaded.model.config.num_local_experts,
        loaded.model.config.num_experts_per_tok,
    )


# ----------------------------------------------------------------------------- out of memory


def fail_above(monkeypatch, model, rows: int, error: Exception) -> list[int]:
    """Make `model` raise `error` for any forward over more than `rows` rows; record sizes."""
    forward = model.forward
    seen: list[int] = []

    def guarded(*args, **kwargs):
        size = kwargs["input_ids"].shape[0]
        seen.append(size)
        if size > rows:
            raise error
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", guarded)
    return seen


@pytest.mark.parametrize("task", ["mc", "generate"])
def test_out_of_memory_halves_the_batch_and_reruns(loaded, mc_task, monkeypatch, caplog, task):
    spec = mc_task if task == "mc" else "reverse"
    ev = Evaluator(loaded, spec, batch_size=16, max_examples=12)
    expected = ev.evaluate(None)
    expected_outputs = ev.last_outputs

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    seen = fail_above(monkeypatch, loaded.model, 4, oom)
    with caplog.at_level(logging.WARNING, logger="eep.fitness"):
        result = ev.evaluate(None)
    halvings = [r.message for r in caplog.records if "halved" in r.message]
    assert halvings[0] == "batch size halved to 8 after out-of-memory"
    assert ev.batch_size <= 4 and len(halvings) == len(set(halvings))
    assert max(seen[-3:]) <= 4
    assert result.hits == expected.hits
    for got, want in zip(ev.last_outputs, expected_outputs, strict=True):
        assert got == pytest.approx(want, abs=1e-4) if task == "mc" else got == want
    # The smaller batches stay for the rest of the run: no more out-of-memory.
    caplog.clear()
    ev.evaluate(None)
    assert not [r for r in caplog.records if "halved" in r.message]


def test_out_of_memory_message_in_runtime_error_counts(loaded, monkeypatch):
    ev = Evaluator(loaded, "count", batch_size=8, max_examples=8)
    expected = ev.evaluate(None).hits
    fail_above(monkeypatch, loaded.model, 2, RuntimeError("HIP out of memory; tried to allocate"))
    assert ev.evaluate(None).hits == expected and ev.batch_size == 2


def test_other_errors_and_oom_of_a_single_example_propagate(loaded, monkeypatch):
    ev = Evaluator(loaded, "count", batch_size=4, max_examples=4)
    fail_above(monkeypatch, loaded.model, 2, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ev.evaluate(None)
    assert ev.batch_size == 4
    monkeypatch.undo()
    ev = Evaluator(loaded, "count", batch_size=4, max_examples=4)
    fail_above(monkeypatch, loaded.model, 0, torch.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        ev.evaluate(None)
    assert ev.batch_size == 1


# ----------------------------------------------------------------------------- inputs


def test_option_split_moves_trailing_space_to_the_option():
    tokenizer = build_tokenizer()
    context, option = encode_choice(tokenizer, "compare 1 2 ", "2")
    assert tokenizer.decode(context, skip_special_tokens=True) == "compare 1 2"
    assert tokenizer.decode(option) == " 2"
    assert context[0] == tokenizer.bos_token_id


def test_bad_arguments_fail_before_loading_a_model(mc_task):
    with pytest.raises(ValueError, match="batch_size"):
        Evaluator("builtin:no-such-model", mc_task, batch_size=0)
    with pytest.raises(ValueError, match="unknown task"):
        Evaluator("builtin:no-such-model", "no-such-task")
