"""The built-in synthetic tasks, the character tokenizer and the shipped tiny MoE."""

from __future__ import annotations

from pathlib import Path

import pytest

from eep.builtin import MODELS as BUILTIN_MODELS_INFO
from eep.builtin.tokenizer import build_tokenizer
from eep.tasks.synthetic import (
    SPLITS,
    SYNTHETIC_TASKS,
    make_examples,
    max_new_tokens,
    split_of,
    task_kind,
)

TINY_MOE = Path(__file__).resolve().parents[1] / "eep" / "builtin" / "tiny-moe"


def test_task_list_has_both_kinds() -> None:
    assert len(SYNTHETIC_TASKS) >= 7
    kinds = {task_kind(name) for name in SYNTHETIC_TASKS}
    assert kinds == {"generate", "multiple_choice"}


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_deterministic_for_a_seed(name: str) -> None:
    assert make_examples(name, "dev", 50, seed=3) == make_examples(name, "dev", 50, seed=3)
    assert make_examples(name, "dev", 50, seed=3) != make_examples(name, "dev", 50, seed=4)


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_sizes_ids_and_prompt_format(name: str) -> None:
    examples = make_examples(name, "test", 200)
    assert len(examples) == 200
    assert [ex.id for ex in examples] == [f"{name}-test-{i}" for i in range(200)]
    assert len({ex.prompt for ex in examples}) == 200
    for ex in examples:
        assert ex.prompt.startswith(name + " ") and ex.prompt.endswith("=")
        assert len(ex.answers[0]) + 1 <= max_new_tokens(name)


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_splits_never_share_a_prompt(name: str) -> None:
    prompts = {}
    for split in SPLITS:
        # Two seeds: a prompt keeps its split whatever the seed.
        prompts[split] = {
            ex.prompt for seed in (0, 1) for ex in make_examples(name, split, 150, seed=seed)
        }
        assert all(split_of(p) == split for p in prompts[split])
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)


def test_generation_answers_are_correct() -> None:
    ex = make_examples("add", "train", 1)[0]
    a, b = ex.prompt.removeprefix("add ").removesuffix("=").split("+")
    assert ex.answers == (str(int(a) + int(b)),)
    ex = make_examples("sort", "train", 1)[0]
    assert ex.answers == ("".join(sorted(ex.prompt.removeprefix("sort ").removesuffix("="))),)
    ex = make_examples("reverse", "train", 1)[0]
    assert ex.answers == (ex.prompt.removeprefix("reverse ").removesuffix("=")[::-1],)
    for ex in make_examples("count", "train", 20):
        letter, text = ex.prompt.removeprefix("count ").removesuffix("=").split(" in ")
        assert ex.answers == (str(text.count(letter)),)
    for ex in make_examples("lookup", "train", 20):
        query, *pairs = ex.prompt.removeprefix("lookup ").removesuffix("=").split()
        assert ex.answers == (dict(pairs)[query],)


def test_multiple_choice_examples_are_well_formed() -> None:
    for name in SYNTHETIC_TASKS:
        if task_kind(name) != "multiple_choice":
            assert all(not ex.options and ex.label is None for ex in make_examples(name, "dev", 20))
            continue
        examples = make_examples(name, "dev", 200)
        assert {ex.label for ex in examples} == {0, 1}  # both positions are right sometimes
        for ex in examples:
            assert ex.is_multiple_choice and len(set(ex.options)) == len(ex.options) >= 2
            assert ex.answers == (ex.options[ex.label],)


def test_compare_picks_the_larger_number() -> None:
    for ex in make_examples("compare", "search", 50):
        assert int(ex.answers[0]) == max(int(o) for o in ex.options)


def test_unknown_task_and_split_and_exhausted_split() -> None:
    with pytest.raises(ValueError, match="add, reverse"):
        make_examples("nope", "train", 1)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        task_kind("nope")
    with pytest.raises(ValueError, match="splits are"):
        make_examples("add", "validation", 1)
    # 2-digit addition has 10,000 prompts, about 1,000 of them in test.
    with pytest.raises(ValueError, match="cannot yield 5000"):
        make_examples("add", "test", 5000)


def test_tokenizer_covers_every_task_without_unk(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    for name in SYNTHETIC_TASKS:
        for ex in make_examples(name, "train", 100):
            for continuation in ex.options or ex.answers:
                text = ex.prompt + continuation
                ids = tokenizer(text)["input_ids"]
                assert ids[0] == tokenizer.bos_token_id
                assert tokenizer.unk_token_id not in ids
                assert len(ids) == len(text) + 1  # one token per character
                assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_shipped_tiny_moe_loads_and_is_small() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(f.stat().st_size for f in TINY_MOE.rglob("*") if f.is_file())
    assert size < 10 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(TINY_MOE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE)
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    assert model.config.vocab_size == len(tokenizer)
    # reverse: 1.0 on the shipped model's test examples, so one example is a fair check.
    ex = make_examples("reverse", "test", 1)[0]
    ids = tokenizer(ex.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens("reverse"), do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text == ex.answers[0]


@pytest.mark.parametrize("name", list(BUILTIN_MODELS_INFO))
def test_shipped_model_solves_every_task_with_the_generators_in_this_tree(name: str) -> None:
    """Guards the pair (task formats, shipped weights): a format change needs a retrained model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eep.builtin.train_tiny import evaluate_tasks

    builtin = BUILTIN_MODELS_INFO[name]
    record = builtin.training_record()
    model = AutoModelForCausalLM.from_pretrained(builtin.path, dtype=torch.float32)
    model.set_experts_implementation("eager")
    n = record["test_examples_per_task"]
    accuracy = evaluate_tasks(model, AutoTokenizer.from_pretrained(builtin.path), "test", n=n)
    # The same examples training.json reports on: equal up to float noise in a near-tie.
    assert accuracy == pytest.approx(record["test_accuracy"], abs=0.011)
    assert min(accuracy.values()) >= builtin.min_accuracy, accuracy


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_tied_steps_train_every_layers_experts_as_one(
    tmp_path: Path, monkeypatch, arch: str
) -> None:
    from transformers import AutoModelForCausalLM

    from eep.builtin import train_tiny

    # mixtral: the shipped shape; qwen3_moe: a small fine-grained one (16 experts, top-4).
    shape = train_tiny.ModelShape() if arch == "mixtral" else train_tiny.ModelShape(
        arch=arch, layers=2, hidden=32, intermediate=8, experts=16, top_k=4, heads=2
    )

    monkeypatch.setattr(train_tiny, "TRAIN_POOL", 64)
    monkeypatch.setattr(train_tiny, "TRAIN_POOL_SMALL", {})
    monkeypatch.setattr(train_tiny, "EVAL_EXAMPLES", 4)

    def experts_equal(out: Path) -> list[bool]:
        model = AutoModelForCausalLM.from_pretrained(out)  # fused [E, ...] expert tensors
        fused = [p for name, p in model.named_parameters() if ".experts." in name]
        assert len(fused) == 2 * model.config.num_hidden_layers
        return [bool((p == p[:1]).all()) for p in fused]

    train_tiny.train(
        tmp_path / "tied", steps=3, batch_size=8, eval_every=0, tied_steps=3, shape=shape
    )
    assert all(experts_equal(tmp_path / "tied"))
    train_tiny.train(
        tmp_path / "apart", steps=3, batch_size=8, eval_every=0, tied_steps=1, shape=shape
    )
    assert not any(experts_equal(tmp_path / "apart"))


@pytest.mark.parametrize("name", list(BUILTIN_MODELS_INFO))
def test_shipped_model_fits_in_the_package(name: str) -> None:
    """Each built-in model's folder stays within 20 MB (it ships inside the wheel)."""
    folder = BUILTIN_MODELS_INFO[name].path
    assert (folder / "config.json").is_file() and (folder / "training.json").is_file()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 1000 * 1000, f"builtin:{name} is {size / 1e6:.1f} MB"
