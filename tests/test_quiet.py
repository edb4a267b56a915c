"""Quiet runs: eep's own calls raise no deprecation warning, Python's or transformers' logged one."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import transformers.utils.logging as hf_logging

from eep.builtin.tokenizer import build_tokenizer
from eep.candidate import Candidate
from eep.fitness import Evaluator
from eep.models.loading import LoadedModel
from eep.models.testing import tiny_model

ROOT = Path(__file__).resolve().parent.parent


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Messages transformers logs at WARNING or above while the test runs.

    transformers' root logger does not propagate (caplog cannot see it) and `warning_once`
    remembers what it said in this process, so the memory is cleared first: an earlier test
    that triggered the same message must not hide it here.
    """
    hf_logging.warning_once.cache_clear()
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    """A tiny random Mixtral with the built-in tokenizer."""
    tokenizer = build_tokenizer()
    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    return LoadedModel(model=model, tokenizer=tokenizer, path="", spec="tiny-random")


@pytest.mark.parametrize("task", ["add", "compare"])
def test_evaluation_raises_and_logs_no_deprecation(loaded, transformers_warnings, task):
    """Generation (KV cache loop) and multiple choice, full model and a pruned candidate."""
    evaluator = Evaluator(loaded, task, max_examples=6, batch_size=4)
    pruned = Candidate.from_kept([[0, 2, 4, 6]] * evaluator.num_layers, evaluator.num_experts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluator.evaluate(None)
        evaluator.evaluate(pruned)
    deprecations = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    assert deprecations == []
    assert [m for m in transformers_warnings if "deprecat" in m.lower()] == []


def test_license_is_an_spdx_string():
    """PEP 639: `license` is an SPDX expression, not the deprecated `{text = ...}` table."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    setuptools_req = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools_req == ["setuptools>=77"]
