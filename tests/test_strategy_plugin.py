"""A strategy is a plug-in: one module + one registry entry, and no eep module knows its name.

The toy strategy below lives in this test file only. Registering it makes it a valid campaign
`strategy:`, `build_strategy` builds it, and a real campaign (InProcessPool, Evaluator, tiny
random model) runs it to a summary whose rows carry the toy's own labels, which the text table
and the report show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytest
from pydantic import Field

from eep.builtin.tokenizer import build_tokenizer
from eep.campaign import run_campaign
from eep.candidate import Candidate
from eep.config import ConfigError, config_from_dict
from eep.models.testing import tiny_model
from eep.report import write_report
from eep.runlog import RunLog
from eep.search import BaseStrategy, SearchSettings, build_strategy
from eep.search.registry import Finalists, StrategyEntry, register, unregister


class ToySettings(SearchSettings):
    """Random pure prunings, `budget` of them."""

    kind: Literal["toy"] = "toy"
    budget: int = Field(default=6, ge=1)


class ToyStrategy(BaseStrategy):
    """i.i.d. random pure prunings; phase "early" for the first half, "late" after."""

    kind = "toy"

    def _finished(self) -> bool:
        return self.evaluations >= self.settings.budget

    def _capacity(self) -> int:
        return self.settings.budget - self._used()

    def _propose(self) -> Candidate:
        phase = "early" if self._used() < self.settings.budget // 2 else "late"
        merge = [self._one_hot(self._random_subset()) for _ in range(self.groups.num_groups)]
        return self._candidate(merge, [m.clone() for m in merge], phase, operator="toy")

    def early_best(self, n: int) -> list[tuple[Candidate, float]]:
        """The n best of the first half."""
        return [(c, s) for c, s in self.best(self.evaluations) if c.phase == "early"][:n]


def _build(settings, num_layers, num_experts, seed, model_id, init_from: Sequence[Candidate]):
    return ToyStrategy(settings, num_layers, num_experts, seed, model_id)


TOY = StrategyEntry(
    kind="toy",
    settings=ToySettings,
    factory=_build,
    finalists=(
        Finalists("toy_early", "toy, first half", ToyStrategy.early_best, phases=("early",)),
        Finalists("toy", "toy search"),
    ),
    expected_evaluations=lambda settings: settings.budget,
)


@pytest.fixture
def toy_registered():
    register(TOY)
    yield TOY
    unregister("toy")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("mixtral", seed=0, num_layers=2).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def config(model_dir, run_dir, strategy):
    return config_from_dict({
        "name": "toy",
        "model": model_dir,
        "task": {"name": "add", "source": {"kind": "builtin", "name": "add"},
                 "splits": {"search": 4, "dev": 4, "test": 4}},
        "keep": 4,
        "strategy": strategy,
        "final": {"random_baselines": 1, "dev_top": 2},
        "evaluation": {"device": "cpu", "dtype": "float32", "batch_size": 8, "threads": 1},
        "output": {"run_dir": str(run_dir), "export": False},
        "seed": 3,
    })


def test_unregistered_kind_is_refused_with_the_known_kinds(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown strategy kind 'toy'.*eep"):
        config(model_dir, tmp_path / "run", {"kind": "toy"})


def test_registered_toy_validates_and_builds(toy_registered, model_dir, tmp_path):
    cfg = config(model_dir, tmp_path / "run", {"kind": "toy", "budget": 5})
    assert isinstance(cfg.strategy, ToySettings) and cfg.strategy.keep == 4
    assert "budget: 5" in cfg.to_yaml()
    assert isinstance(build_strategy(cfg.strategy, 2, 8), ToyStrategy)
    with pytest.raises(ConfigError, match="strategy.total_iter: unknown field"):
        config(model_dir, tmp_path / "run", {"kind": "toy", "total_iter": 5})


def test_a_registered_toy_strategy_runs_a_real_campaign(toy_registered, model_dir, tmp_path):
    result = run_campaign(config(model_dir, tmp_path / "run", {"kind": "toy"}), quiet=True)
    summary = result.summary
    assert summary["strategy"] == "toy" and summary["chosen"] == "toy"
    methods = summary["methods"]
    assert list(methods) == ["full", "random", "toy_early", "toy"]
    assert methods["toy_early"]["label"] == "toy, first half" and methods["toy"]["label"] == "toy search"
    assert methods["toy_early"]["evaluations"] == 3 and methods["toy"]["evaluations"] == 6
    assert "toy, first half" in result.table and "toy search" in result.table
    records = RunLog.open(tmp_path / "run").records
    search = [r for r in records if r["split"] == "search"]
    assert len(search) == 6 and {r["phase"] for r in search} == {"early", "late"}
    assert all(r["id"].startswith("toy-") for r in search)
    dev = {r["hash"] for r in records if r["split"] == "dev"}
    assert 1 <= len(dev) <= 4  # dev_top 2 per list
    assert (tmp_path / "run" / "best.safetensors").is_file()
    page = write_report(tmp_path / "run").html.read_text()
    assert "toy, first half" in page and "toy search" in page
