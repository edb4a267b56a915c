"""Shared fixtures: tiny random MoE models of every supported family, built on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and CI machines have 2 cores shared with pytest itself.
torch.set_num_threads(1)

from eep.models.testing import TINY_FAMILIES, save_tiny_model, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread, whatever an earlier one (or an Evaluator) set."""
    torch.set_num_threads(1)


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    """Every supported family, one test instance each."""
    return request.param


@pytest.fixture
def make_tiny():
    """Factory for a fresh tiny random model of a family (same seed -> same weights)."""
    return tiny_model


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """A run directory written by a real campaign: EEP on a tiny random Mixtral, in-process pool.

    Both search phases, dev re-ranking and test scores are in it, so the dashboard and report
    tests read what `eep.campaign` really writes (schema drift fails them), not a hand-made copy.
    Made once per session (about ten seconds).
    """
    root = tmp_path_factory.mktemp("real-campaign")
    save_tiny_model(root / "model", "mixtral", num_layers=2)
    strategy = {"kind": "eep", "init_population": 4, "discrete_iter": 10, "total_iter": 19}
    output = {"run_dir": str(root / "real-tiny"), "export": False, "checkpoint_every": 5}
    return run_tiny_campaign("real-tiny", str(root / "model"), strategy, output)


def run_tiny_campaign(name: str, model: str, strategy: dict, output: dict):
    """A real in-process campaign on `compare` (8 examples per split), keep 4, seed 0."""
    from eep.campaign import run_campaign  # noqa: PLC0415
    from eep.config import config_from_dict  # noqa: PLC0415

    config = config_from_dict({
        "name": name,
        "model": model,
        "task": {"name": "compare", "source": {"kind": "builtin", "name": "compare"},
                 "splits": {"search": 8, "dev": 8, "test": 8}},
        "keep": 4,
        "strategy": strategy,
        "final": {"random_baselines": 2, "dev_top": 2},
        "workers": 0,
        "evaluation": {"device": "cpu", "threads": 1},
        "seed": 0,
        "output": output,
    })
    return run_campaign(config, quiet=True)
