"""train_tiny's architecture options: the config it builds and a short training run that saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from eep.builtin import train_tiny
from eep.builtin.tokenizer import build_tokenizer

TINY_MOE = Path(__file__).resolve().parents[1] / "eep" / "builtin" / "tiny-moe"


def test_default_config_is_the_shipped_tiny_moe() -> None:
    config = train_tiny.model_config(build_tokenizer()).to_dict()
    shipped = json.loads((TINY_MOE / "config.json").read_text())
    # Bookkeeping keys (versions, dtype, architectures) differ; every model field must not.
    keys = [k for k in shipped if k not in {"architectures", "dtype", "transformers_version"}]
    assert {k: config[k] for k in keys} == {k: shipped[k] for k in keys}


@pytest.mark.parametrize(
    ("arch", "experts_key", "width_key", "class_name"),
    [
        ("mixtral", "num_local_experts", "intermediate_size", "MixtralConfig"),
        ("qwen3_moe", "num_experts", "moe_intermediate_size", "Qwen3MoeConfig"),
        ("olmoe", "num_experts", "intermediate_size", "OlmoeConfig"),
    ],
)
def test_config_has_the_requested_shape(
    arch: str, experts_key: str, width_key: str, class_name: str
) -> None:
    shape = train_tiny.ModelShape(
        arch=arch, layers=3, hidden=48, intermediate=24, experts=16, top_k=4, heads=3
    )
    config = train_tiny.model_config(build_tokenizer(), shape)
    assert type(config).__name__ == class_name
    assert config.num_hidden_layers == 3
    assert config.hidden_size == 48
    assert config.num_attention_heads == 3
    assert getattr(config, experts_key) == 16
    assert getattr(config, width_key) == 24
    assert config.num_experts_per_tok == 4
    if arch == "qwen3_moe":
        # Every layer sparse and top-k renormalised, as Qwen3-MoE; head_dim follows the hidden size.
        assert config.norm_topk_prob is True
        assert config.mlp_only_layers == []
        assert config.decoder_sparse_step == 1
        assert config.head_dim == 16


def test_shape_rejects_top_k_above_experts() -> None:
    with pytest.raises(ValidationError, match="top_k 9 > experts 8"):
        train_tiny.ModelShape(top_k=9)


def test_short_qwen3_moe_run_saves_a_stock_model_and_its_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(train_tiny, "TRAIN_POOL", 32)
    monkeypatch.setattr(train_tiny, "TRAIN_POOL_SMALL", {})
    monkeypatch.setattr(train_tiny, "EVAL_EXAMPLES", 4)
    shape = train_tiny.ModelShape(
        arch="qwen3_moe", layers=2, hidden=32, intermediate=8, experts=16, top_k=4, heads=2
    )
    out = tmp_path / "fine"
    train_tiny.train(
        out, steps=2, batch_size=4, eval_every=0, tied_steps=1, shape=shape,
        experts_implementation="grouped_mm",
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.num_experts == 16 and model.config.num_hidden_layers == 2
    record = json.loads((out / "training.json").read_text())
    assert record["arch"] == "qwen3_moe"
    assert record["shape"] == {
        "layers": 2, "hidden": 32, "intermediate": 8, "experts": 16, "top_k": 4, "heads": 2
    }
    assert record["experts_implementation"] == "grouped_mm"
    assert record["steps"] == 2 and record["tied_steps"] == 1
    assert set(record["test_accuracy"]) == set(train_tiny.SYNTHETIC_TASKS)


def test_command_line_options_reach_the_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(train_tiny, "train", lambda out, steps, **kw: seen.update(kw, steps=steps))
    train_tiny.main([])
    assert seen["shape"] == train_tiny.ModelShape()  # no arguments: the shipped recipe
    assert (seen["steps"], seen["seed"], seen["tied_steps"]) == (4500, 1, 2000)
    train_tiny.main(["--arch", "olmoe", "--layers", "9", "--experts", "64", "--top-k", "8",
                     "--intermediate", "32", "--hidden", "96", "--heads", "6",
                     "--experts-impl", "grouped_mm"])
    assert seen["shape"] == train_tiny.ModelShape(
        arch="olmoe", layers=9, hidden=96, intermediate=32, experts=64, top_k=8, heads=6
    )
    assert seen["experts_implementation"] == "grouped_mm"
