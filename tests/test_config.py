"""Campaign YAML: validation errors name file and field; overrides; shipped configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from eep.config import ConfigError, apply_override, config_from_dict, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
BASE = {"name": "t", "model": "builtin:tiny-moe", "task": "add", "keep": 4}


def test_defaults_flow_into_strategy():
    cfg = config_from_dict(BASE)
    assert cfg.strategy.kind == "eep" and cfg.strategy.keep == 4
    assert cfg.strategy.total_iter == 400 and cfg.strategy.mutate_scale == 0.065
    assert cfg.task.name == "add"
    again = config_from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg  # the resolved YAML round-trips


def test_top_level_fields_reach_the_strategy():
    cfg = config_from_dict({**BASE, "top_k": 1, "router_mapping": "logits", "groups": 2, "strategy": "random"})
    assert (cfg.strategy.kind, cfg.strategy.top_k, cfg.strategy.router_mapping, cfg.strategy.groups) == (
        "random", 1, "logits", 2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**BASE, "keep": 0}, "keep"),
        ({**BASE, "strategy": {"kind": "eep", "mutate_prob": 2}}, "strategy.mutate_prob"),
        ({**BASE, "strategy": {"kind": "annealing"}}, "strategy: unknown strategy kind 'annealing'.*eep"),
        ({**BASE, "strategy": {"kind": "random", "total_iter": 3}}, "strategy.total_iter: unknown field"),
        ({**BASE, "strategy": {"kind": "eep", "dev_top": 4}, "final": {"dev_top": 5}},
         r"strategy.dev_top \(4\) and final.dev_top \(5\) disagree"),
        ({**BASE, "bogus": 1}, "bogus"),
        ({**BASE, "task": "no-such-task"}, "no-such-task"),
        ({**BASE, "strategy": {"kind": "eep", "keep": 2}}, "set keep once"),
        ({k: v for k, v in BASE.items() if k != "model"}, "model"),
        ({**BASE, "top_k": 5}, "top_k=5 exceeds keep=4"),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data, origin="x.yaml")


def test_dev_top_has_one_source_final_dev_top():
    assert config_from_dict(BASE).final.dev_top == 20
    assert not hasattr(config_from_dict(BASE).strategy, "dev_top")
    # An older file's EEP `strategy.dev_top` moves to final.dev_top (equal values are no conflict).
    old = config_from_dict({**BASE, "strategy": {"kind": "eep", "dev_top": 4}})
    assert old.final.dev_top == 4 and "dev_top" not in old.to_yaml().split("final:")[0]
    same = config_from_dict({**BASE, "strategy": {"kind": "eep", "dev_top": 4}, "final": {"dev_top": 4}})
    assert same == old


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: campaign file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: t\nmodel: builtin:tiny-moe\ntask: add\nkeep: many\n")
    with pytest.raises(ConfigError, match=r"(?s)wrong.yaml: invalid campaign config.*keep: Input should be a valid integer"):
        load_config(wrong)


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\nmodel: builtin:tiny-moe\ntask: add\nkeep: 4\nstrategy: eep\n")
    cfg = load_config(path, ["strategy.total_iter=50", "workers=2", "budget.max_seconds=9.5", "keep=2"])
    assert (cfg.strategy.total_iter, cfg.workers, cfg.budget.max_seconds, cfg.keep, cfg.strategy.keep) == (
        50, 2, 9.5, 2, 2)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "strategy.total_iter")
    with pytest.raises(ConfigError, match="'keep' is not a mapping"):
        apply_override({"keep": 4}, "keep.x=1")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.keep >= 1 and cfg.name
