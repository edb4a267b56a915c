"""Shared fixtures: tiny random MoE models of every supported family, built on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and CI machines have 2 cores shared with pytest itself.
torch.set_num_threads(1)

from eep.models.testing import TINY_FAMILIES, tiny_model  # noqa: E402


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
