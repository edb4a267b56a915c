"""`eep prune` end to end, calibration specs, and campaign seeds from method names."""

from __future__ import annotations

import json

import pytest

from eep.builtin.tokenizer import build_tokenizer
from eep.candidate import Candidate
from eep.cli import main
from eep.export import export_model
from eep.models.surgery import Surgery
from eep.models.testing import tiny_model
from eep.oneshot import METHODS, seed_candidates
from eep.oneshot.calibration import (
    Calibration,
    CalibrationError,
    calibration_texts,
    parse_calibration,
    task_calibration,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("mixtral", num_layers=2).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("method", METHODS)
def test_prune_writes_a_candidate_that_surgery_and_export_accept(tmp_path, model_dir, method, capsys):
    out = tmp_path / "c.safetensors"
    argv = ["prune", "--model", str(model_dir), "--method", method, "--keep", "4", "--out", str(out),
            "--calibration", "builtin", "--samples", "14"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    cand = Candidate.load(out)
    assert cand.phase == "oneshot" and cand.extra["method"] == method
    assert cand.is_pure_pruning() and cand.keep == 4 and cand.num_layers == 2
    Surgery(tiny_model("mixtral", num_layers=2)).check(cand)
    if method == "naee":
        report = export_model(str(model_dir), cand, tmp_path / "export")
        assert report.stock and report.keep == 4


def test_prune_task_specific_with_skipping(tmp_path, model_dir, capsys):
    out = tmp_path / "c.safetensors"
    argv = ["prune", "--model", str(model_dir), "--method", "naee", "--keep", "2", "--out", str(out),
            "--task", "count", "--samples", "12", "--skip", "--order", "progressive"]
    assert main(argv) == 0
    capsys.readouterr()
    cand = Candidate.load(out)
    assert cand.extra["order"] == "progressive" and "task count" in cand.extra["calibration"]
    assert len(cand.extra["skip_thresholds"]) == 2 and cand.extra["skip_quantile"] == 0.5
    config = json.loads((export_model(str(model_dir), cand, tmp_path / "e").out_dir / "config.json").read_text())
    assert config["eep_skip_thresholds"] == cand.extra["skip_thresholds"]
    # Median thresholds skip about half the tokens' second expert: a share strictly inside (0, 0.5].
    argv = ["evaluate", "--model", str(model_dir), "--task", "count", "--limit", "6", "--json"]
    assert main([*argv, "--candidate", str(out)]) == 0
    assert 0.0 < json.loads(capsys.readouterr().out)["skipped_fraction"] <= 0.5
    assert main(argv) == 0
    assert "skipped_fraction" not in json.loads(capsys.readouterr().out)
    assert main(argv[:-1] + ["--candidate", str(out)]) == 0
    assert "% of expert calls skipped" in capsys.readouterr().out


def test_prune_errors_name_the_problem(tmp_path, model_dir, capsys):
    argv = ["prune", "--model", str(model_dir), "--method", "reap", "--keep", "4", "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    assert "needs --task T or --calibration SPEC" in capsys.readouterr().err
    argv[-1:] = [str(tmp_path / "c"), "--calibration", "nothing-here"]
    assert main(argv) == 2
    assert "expected builtin" in capsys.readouterr().err


def test_calibration_specs_and_packing(tmp_path):
    assert parse_calibration("builtin", samples=7).samples == 7
    hf = parse_calibration("hf:allenai/c4:en", batch_size=2)
    assert (hf.source, hf.path, hf.name, hf.packs) == ("hf", "allenai/c4", "en", True)
    lines = [json.dumps({"text": f"doc {i} " + "ab" * i}) for i in range(20)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    spec = parse_calibration(str(tmp_path / "c.jsonl"), samples=5, max_length=16, batch_size=2)
    texts, examples = calibration_texts(spec)
    assert len(texts) == 5 and not examples and len(set(texts)) == 5  # a seeded sample
    cal = Calibration.build(spec, build_tokenizer())
    assert all(b.input_ids.shape[1] == 16 for b in cal) and cal.tokens % 16 == 0  # packed blocks
    (tmp_path / "s.yaml").write_text(f"source: jsonl\npath: {tmp_path / 'c.jsonl'}\npack: false\n")
    rows = Calibration.build(parse_calibration(str(tmp_path / "s.yaml"), batch_size=4), build_tokenizer(), 64)
    assert rows.tokens == sum(len(t) + 1 for t in calibration_texts(parse_calibration(str(tmp_path / "s.yaml")))[0])
    builtin, examples = calibration_texts(parse_calibration("builtin", samples=14))
    assert examples and [t.split()[0] for t in builtin[:7]] == ["add", "reverse", "sort", "caesar", "count", "lookup", "compare"]
    task, _ = calibration_texts(task_calibration("count", samples=3))
    assert len(task) == 3 and all(t.startswith("count ") and "=" in t for t in task)
    with pytest.raises(CalibrationError, match="not found"):
        parse_calibration(str(tmp_path / "missing.jsonl"))


def test_seed_candidates_from_method_names(tmp_path, model_dir):
    out = tmp_path / "run"
    out.mkdir()
    file = Candidate.from_kept([[0, 1, 2, 3]] * 2, 8).save(tmp_path / "given.safetensors")
    seeds = seed_candidates(["frequency", str(file), "random"], str(model_dir), "count", 4, out, seed=3)
    assert [c.extra.get("method") for c in seeds] == ["frequency", None, "random"]
    assert (out / "init_frequency.safetensors").is_file()
    again = seed_candidates(["frequency"], "no-such-model-needed", "count", 4, out)  # read back
    assert again[0].kept_experts() == seeds[0].kept_experts()
    with pytest.raises(ValueError, match="neither a candidate file nor a one-shot method"):
        seed_candidates(["neee"], str(model_dir), "count", 4, out)


def test_campaign_seeds_its_search_from_method_names(tmp_path, model_dir):
    from eep.campaign import Campaign
    from eep.config import config_from_dict

    config = config_from_dict({
        "model": str(model_dir), "task": "count", "keep": 4,
        "strategy": {"kind": "eep", "init_population": 4, "discrete_iter": 6, "total_iter": 8},
        "init_from": ["naee", "frequency"],
        "output": {"run_dir": str(tmp_path / "run"), "export": False},
    })
    campaign = Campaign(config, quiet=True)
    first = [campaign.strategy.ask(1)[0] for _ in range(2)]
    naee = Candidate.load(tmp_path / "run" / "init_naee.safetensors")
    frequency = Candidate.load(tmp_path / "run" / "init_frequency.safetensors")
    assert naee.extra["method"] == "naee" and "task count" in naee.extra["calibration"]
    def kept(c):
        return [sorted(layer) for layer in c.kept_experts()]

    assert [kept(c) for c in first] == [kept(naee), kept(frequency)]  # the seeds come first


@pytest.mark.parametrize("method", METHODS)
def test_prune_under_a_global_budget(tmp_path, model_dir, method, capsys):
    """--keep-min/--keep-max: per-layer counts from the criterion ranked across layers, sum fixed."""
    from eep.oneshot import oneshot_prune
    from eep.oneshot.criteria import criteria_scores
    from eep.oneshot.calibration import build_calibration
    from eep.models.loading import load_model
    from eep.search.budget import KeepBudget

    out = tmp_path / "c.safetensors"
    argv = ["prune", "--model", str(model_dir), "--method", method, "--keep", "3", "--keep-min", "1",
            "--keep-max", "5", "--out", str(out), "--calibration", "builtin", "--samples", "14"]
    assert main(argv) == 0
    assert "6 experts over 2 MoE layers (1..5 of 8 each)" in capsys.readouterr().out
    cand = Candidate.load(out)
    budget = KeepBudget(6, 1, 5, num_layers=2, num_experts=8)
    budget.check(cand.keep_per_layer)
    assert cand.is_pure_pruning() and cand.extra["budget"] == [6, 1, 5]
    if method in ("random",):
        return
    loaded = load_model(str(model_dir))
    spec = parse_calibration("builtin", samples=14)
    scores = criteria_scores(loaded.model, build_calibration(spec, loaded.model, loaded.tokenizer))
    by = "reap" if method == "naee" else method
    allocation = budget.allocate_by_scores(scores.scores(by))
    assert [len(k) for k in cand.kept_experts()] == [len(k) for k in allocation]
    if method != "naee":
        assert [sorted(k) for k in cand.kept_experts()] == allocation
    else:  # NAEE's own subset at each layer's count (top-2 model: counts of 2 and more)
        for layer, k in enumerate(cand.keep_per_layer):
            if k >= 2:
                alone = oneshot_prune(loaded, "naee", k, spec).candidate
                assert sorted(cand.kept_experts()[layer]) == sorted(alone.kept_experts()[layer])


def test_prune_budget_errors_name_the_arguments(tmp_path, model_dir, capsys):
    argv = ["prune", "--model", str(model_dir), "--method", "random", "--keep", "3", "--keep-min", "4",
            "--out", str(tmp_path / "c.safetensors")]
    assert main(argv) == 2
    assert "--keep 3 --keep-min 4 --keep-max 8: " in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()
