"""Per-task routing histograms: which experts a task's tokens choose, layer by layer.

A histogram is the share of a layer's top-k choices that go to each expert over every real token
(prompt and gold answer) of a task split. Tasks that route alike leave little for pruning to
exploit; tasks that use different experts are what makes task-specific pruning worth searching.
Specialisation in one number per layer: the total-variation distance between two tasks'
histograms (0 = identical choices, 1 = disjoint experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep.models.loading import LoadedModel, load_model
from eep.oneshot.calibration import build_calibration, task_calibration
from eep.oneshot.criteria import frequency_counts
from eep.tasks.registry import resolve_task


@dataclass
class RoutingHistograms:
    """Share of top-k choices per task, MoE layer and expert; rows sum to 1."""

    tasks: list[str]
    shares: torch.Tensor  # [tasks, layers, experts] float64
    tokens: list[int]  # real tokens seen per task
    split: str

    def distance(self, a: int, b: int) -> torch.Tensor:
        """Per layer, the total-variation distance between tasks a and b."""
        return 0.5 * (self.shares[a] - self.shares[b]).abs().sum(-1)

    def mean_distance(self) -> list[float]:
        """Per layer, the mean total-variation distance over task pairs (empty for one task)."""
        pairs = [(a, b) for a in range(len(self.tasks)) for b in range(a + 1, len(self.tasks))]
        if not pairs:
            return []
        return torch.stack([self.distance(a, b) for a, b in pairs]).mean(0).tolist()

    def to_dict(self) -> dict:
        """JSON-ready: shares[task][layer][expert], tokens per task, mean distance per layer."""
        return {
            "split": self.split,
            "tasks": self.tasks,
            "tokens": dict(zip(self.tasks, self.tokens, strict=True)),
            "shares": {t: [[round(v, 4) for v in row] for row in self.shares[i].tolist()] for i, t in enumerate(self.tasks)},
            "mean_distance": [round(v, 4) for v in self.mean_distance()],
        }

    def format(self) -> str:
        """A table per layer: one row per task, percent of top-k choices per expert."""
        num_experts = self.shares.shape[-1]
        width = max(8, *(len(t) for t in self.tasks))
        lines = [f"routing: % of top-k choices per expert, {self.split} split"]
        for t, task in enumerate(self.tasks):
            lines.append(f"  {task}: {self.tokens[t]} tokens")
        for layer in range(self.shares.shape[1]):
            header = " ".join(f"{'e' + str(e):>4}" for e in range(num_experts))
            lines.append(f"{'layer ' + str(layer):<{width + 2}} {header}")
            for t, task in enumerate(self.tasks):
                row = " ".join(f"{100 * v:4.0f}" for v in self.shares[t, layer].tolist())
                lines.append(f"  {task:<{width}} {row}")
        distances = self.mean_distance()
        if distances:
            lines.append("mean total-variation distance between tasks (0 alike, 1 disjoint):")
            lines.append("  " + "  ".join(f"layer {i}: {d:.2f}" for i, d in enumerate(distances)))
        return "\n".join(lines)


@torch.no_grad()
def routing_histograms(
    model: str | LoadedModel,
    tasks: list[str],
    split: str = "test",
    samples: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> RoutingHistograms:
    """Routing histograms of `model` on each task's `split` (first `samples` examples, or all)."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, trust_remote_code=trust_remote_code)
    net = loaded.model
    names, shares, tokens = [], [], []
    for ref in tasks:
        task = resolve_task(ref)
        calibration = build_calibration(task_calibration(task, split, samples=samples), net, loaded.tokenizer)
        # The `frequency` criterion of eep.oneshot.criteria, without the other criteria's pass.
        counts = frequency_counts(net, calibration)
        shares.append(counts / counts.sum(-1, keepdim=True).clamp(min=1))
        names.append(task.name)
        tokens.append(calibration.tokens)
    return RoutingHistograms(names, torch.stack(shares), tokens, split)
