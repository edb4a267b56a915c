"""Built-in assets: the character tokenizer and the MoE models trained on the synthetic tasks.

`MODELS` names every built-in model (`builtin:NAME`), its folder and what it is for; each
folder's `training.json` holds its recipe (architecture, shape, steps, seed, threads) and the
test accuracy it reached, which the test suite checks the shipped weights still reach.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model: its `builtin:` name, folder and purpose."""

    name: str
    purpose: str
    min_accuracy: float  # every task's test accuracy is at least this (checked by the tests)

    @property
    def path(self) -> Path:
        """The model folder inside the package."""
        return BUILTIN_DIR / self.name

    def training_record(self) -> dict:
        """The folder's training.json (recipe, shape, train time, test accuracy); {} if absent."""
        path = self.path / "training.json"
        return json.loads(path.read_text()) if path.is_file() else {}


MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "tiny-moe",
            "the demo and fast tests: 4-layer Mixtral, 8 experts, top-2; every method ties on it "
            "(401 random draws find a near-optimal pruning)",
            0.95,
        ),
        BuiltinModel(
            "deep-moe",
            "the testbed where pruning methods should separate: Mixtral-like depth, 16 layers, "
            "8 experts of width 128, top-2 (docs/benchmarks.md has its random-pruning figures)",
            0.95,
        ),
        BuiltinModel(
            "fine-moe",
            "the 64-expert code paths on a model that learned something: fine-grained Qwen3-MoE, "
            "8 layers, 64 experts of width 32, top-8 (NAEE's beam search, EEP with E = 64 at keep "
            "32 and 16, the Ray pool with a larger model)",
            0.90,
        ),
    )
}
