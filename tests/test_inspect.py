"""`eep inspect`: parameter counts, pruned sizes and Evaluator memory from a config alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig

from eep.builtin import MODELS as BUILTIN_MODELS
from eep.cli import main
from eep.inspect import GIB, describe_model
from eep.models.families import moe_layers
from eep.models.testing import TINY_FAMILIES, tiny_config, tiny_model

EXPERT_PARAMS_8X7B = 32 * 8 * 3 * 4096 * 14336  # 45,097,156,608


def mixtral_8x7b() -> MixtralConfig:
    return MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_local_experts=8,
        num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
    )


def test_mixtral_8x7b_counts_and_sizes():
    report = describe_model(mixtral_8x7b(), model="Mixtral-8x7B", activation_gib=6)
    assert (report.family, report.num_layers, len(report.moe_layers)) == ("mixtral", 32, 32)
    assert (report.num_experts, report.top_k, report.shared_experts) == (8, 2, 0)
    assert report.total_params == 46_702_792_704  # the published 46.7 B
    assert report.expert_params == EXPERT_PARAMS_8X7B
    assert report.params_per_expert == 3 * 4096 * 14336
    assert report.gate_up_params_per_expert == 2 * 4096 * 14336
    non_expert = 46_702_792_704 - EXPERT_PARAMS_8X7B
    assert report.non_expert_params == non_expert
    per_layer_expert = 3 * 4096 * 14336
    want = {keep: non_expert + 32 * keep * per_layer_expert for keep in (8, 4, 2)}
    assert {s.keep: s.params for s in report.sizes} == want
    assert {s.keep: s.bytes for s in report.sizes} == {k: 2 * p for k, p in want.items()}
    assert round(report.sizes[0].bytes / 1e9, 1) == 93.4
    assert round(report.sizes[1].bytes / 1e9, 1) == 48.3
    assert round(report.sizes[2].bytes / 1e9, 1) == 25.8
    by_keep = {m.keep: m for m in report.evaluator}
    assert set(by_keep) == {4, 2}
    for keep, mem in by_keep.items():
        assert mem.originals_bytes == 2 * EXPERT_PARAMS_8X7B
        assert mem.working_bytes == 2 * want[keep]
        assert mem.total_bytes == mem.originals_bytes + mem.working_bytes + 6 * GIB
    # ~135 GiB at keep 4 (platform notes measured ~134): one H200 or two H100s.
    assert round(by_keep[4].total_bytes / GIB) == 135
    assert by_keep[4].gpus == {"80 GB": 2, "141 GB": 1}
    assert by_keep[2].gpus == {"80 GB": 2, "141 GB": 1}
    text = report.format()
    assert "46.70 B" in text and "45.10 B" in text and "E = 8" in text and "93.4 GB" in text


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_counts_match_a_real_instance(family):
    report = describe_model(tiny_config(family))
    model = tiny_model(family)
    layers = moe_layers(model)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.expert_params == sum(
        layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel() for layer in layers
    )
    assert report.moe_layers == [layer.index for layer in layers]
    assert report.sizes[0].params == report.total_params
    if family.startswith("deepseek"):
        assert report.moe_layers == [1, 2]  # first_k_dense_replace=1
    has_shared = family in ("qwen2_moe", "deepseek_v2", "deepseek_v3")
    assert (report.shared_experts > 0) == has_shared
    assert (report.shared_expert_params > 0) == has_shared


def test_cli_json_is_one_object(tmp_path, capsys):
    tiny_config("qwen2_moe").save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json", "--activation-gib", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "qwen2_moe" and data["num_experts"] == 8
    assert [s["keep"] for s in data["sizes"]] == [8, 4, 2]
    assert [m["keep"] for m in data["evaluator"]] == [4, 2]
    assert data["evaluator"][0]["activation_bytes"] == GIB
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert "shared experts      1 per layer" in capsys.readouterr().out


def test_errors_name_the_problem(tmp_path, capsys):
    LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=96).save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense")]) == 2
    assert "'llama' is not a supported MoE family" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="activation allowance"):
        describe_model(tiny_config("mixtral"), activation_gib=-1)


def test_routing_histograms_count_top_k_choices_per_task(capsys):
    from eep.models.loading import load_model
    from eep.oneshot.calibration import build_calibration, task_calibration
    from eep.routing_stats import routing_histograms
    from eep.tasks.registry import resolve_task

    loaded = load_model("builtin:tiny-moe", "cpu", "float32")
    hists = routing_histograms(loaded, ["sort", "count"], split="test", samples=6)
    model = loaded.model
    top_k, layers = model.config.num_experts_per_tok, model.config.num_hidden_layers
    assert hists.shares.shape == (2, layers, 8)
    for t, name in enumerate(["sort", "count"]):
        # By hand: the stock router's logits of every real token of the same texts.
        spec = task_calibration(resolve_task(name), "test", samples=6)
        counts = torch.zeros(layers, 8)
        for batch in build_calibration(spec, model, loaded.tokenizer):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
            real = batch.attention_mask.reshape(-1).bool()
            for layer, logits in enumerate(out.router_logits):
                chosen = logits[real].topk(top_k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(chosen, minlength=8).float()
        assert torch.allclose(hists.shares[t].float(), counts / counts.sum(-1, keepdim=True))
        assert hists.tokens[t] * top_k == int(counts[0].sum())
    assert torch.equal(hists.distance(0, 0), torch.zeros(layers, dtype=torch.float64))
    distances = hists.mean_distance()
    assert len(distances) == layers and all(0.0 < d <= 1.0 for d in distances)

    assert main(["inspect", "builtin:tiny-moe", "--routing", "sort", "count", "--samples", "6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tasks"] == ["sort", "count"] and data["split"] == "test"
    assert len(data["shares"]["count"]) == layers and len(data["mean_distance"]) == layers
    assert main(["inspect", "builtin:tiny-moe", "--routing", "sort", "--samples", "6"]) == 0
    text = capsys.readouterr().out
    assert "layer 3" in text and "sort" in text and "total-variation" not in text  # one task: no distance
    assert main(["inspect", "builtin:tiny-moe", "--routing", "no-such-task"]) == 2
    assert "no-such-task" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_inspect_a_builtin_shows_its_purpose_and_training_record(name, capsys):
    from eep.builtin import MODELS

    record = MODELS[name].training_record()
    assert main(["inspect", f"builtin:{name}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["builtin"]["purpose"] == MODELS[name].purpose
    assert report["builtin"]["training"] == record
    assert main(["inspect", f"builtin:{name}"]) == 0
    text = capsys.readouterr().out
    assert f"built-in model builtin:{name}" in text
    assert f"trained {record['steps']} steps" in text and f"mean {record['test_accuracy_mean']:.3f}" in text


def test_inspect_a_folder_has_no_builtin_section(tmp_path, capsys):
    tiny_config("mixtral").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["builtin"] is None
