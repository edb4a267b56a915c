"""Layer groups: layers that share one router-mapping and one expert-merging matrix in a search.

The EEP authors search either one pair of matrices per layer or one pair per block of contiguous
layers (4 groups of 8 layers for Mixtral's 32). A candidate always stores per-layer matrices;
`expand` turns group matrices into them and `collapse` reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch

# "per_layer", a number of equal contiguous groups, or explicit inclusive [first, last] ranges.
GroupSpec = Union[Literal["per_layer"], int, Sequence[Sequence[int]]]  # noqa: UP007


class GroupError(ValueError):
    """A group layout that does not cover every layer exactly once, or a candidate off its groups."""


class LayerGroups:
    """An ordered partition of a model's MoE layers into groups of layers."""

    def __init__(self, members: Sequence[Sequence[int]], num_layers: int) -> None:
        if num_layers < 1:
            raise GroupError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.members: list[list[int]] = [list(m) for m in members]
        if not self.members or any(not m for m in self.members):
            raise GroupError("every group needs at least one layer")
        seen: dict[int, int] = {}
        for g, layers in enumerate(self.members):
            for layer in layers:
                if not 0 <= layer < num_layers:
                    raise GroupError(f"group {g} names layer {layer}, outside 0..{num_layers - 1}")
                if layer in seen:
                    raise GroupError(f"layer {layer} is in group {seen[layer]} and group {g}")
                seen[layer] = g
        missing = [layer for layer in range(num_layers) if layer not in seen]
        if missing:
            raise GroupError(f"layers {missing} are in no group; groups must cover all layers")
        self._group_of = [seen[layer] for layer in range(num_layers)]

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def resolve(cls, spec: GroupSpec, num_layers: int) -> LayerGroups:
        """Groups from a spec: "per_layer", N equal contiguous groups, or [[first, last], ...]."""
        if isinstance(spec, str):
            if spec != "per_layer":
                raise GroupError(f"groups must be 'per_layer', a number or ranges, got {spec!r}")
            return cls([[layer] for layer in range(num_layers)], num_layers)
        if isinstance(spec, bool):
            raise GroupError(f"groups must be 'per_layer', a number or ranges, got {spec!r}")
        if isinstance(spec, int):
            if not 1 <= spec <= num_layers:
                raise GroupError(f"groups={spec}: the number of groups must be in 1..{num_layers}")
            # Sizes differ by at most one when the groups do not divide the layers (first ones
            # larger); 32 layers in 4 groups gives the authors' 4 x 8.
            base, extra = divmod(num_layers, spec)
            members, start = [], 0
            for g in range(spec):
                size = base + (1 if g < extra else 0)
                members.append(list(range(start, start + size)))
                start += size
            return cls(members, num_layers)
        members = []
        for item in spec:
            pair = list(item)
            if len(pair) != 2 or not all(isinstance(x, int) for x in pair) or pair[0] > pair[1]:
                raise GroupError(
                    f"group range {item!r} must be [first, last] with first <= last (inclusive)"
                )
            members.append(list(range(pair[0], pair[1] + 1)))
        return cls(members, num_layers)

    # ----------------------------------------------------------------------------- facts
    @property
    def num_groups(self) -> int:
        """Number of groups."""
        return len(self.members)

    def group_of(self, layer: int) -> int:
        """Index of the group that holds `layer`."""
        return self._group_of[layer]

    def to_spec(self) -> list[list[int]]:
        """The groups as lists of layers (JSON-ready)."""
        return [list(m) for m in self.members]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, LayerGroups)
            and self.num_layers == other.num_layers
            and self.members == other.members
        )

    def __repr__(self) -> str:
        return f"LayerGroups({self.members}, num_layers={self.num_layers})"

    # ----------------------------------------------------------------------------- matrices
    def expand(self, group_mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer matrices from one matrix per group (each layer gets its own copy)."""
        if len(group_mats) != self.num_groups:
            raise GroupError(f"expected {self.num_groups} group matrices, got {len(group_mats)}")
        return [group_mats[g].clone() for g in self._group_of]

    def collapse(
        self, layer_mats: Sequence[torch.Tensor], what: str = "matrix"
    ) -> list[torch.Tensor]:
        """One matrix per group from per-layer ones; an error if layers of a group differ."""
        if len(layer_mats) != self.num_layers:
            raise GroupError(
                f"expected {self.num_layers} per-layer matrices, got {len(layer_mats)}"
            )
        out = []
        for g, layers in enumerate(self.members):
            first = layer_mats[layers[0]]
            for layer in layers[1:]:
                if not torch.equal(layer_mats[layer], first):
                    raise GroupError(
                        f"{what}: layers {layers[0]} and {layer} differ but share group {g}; "
                        "use groups: per_layer (or groups that match the candidate)"
                    )
            out.append(first.clone())
        return out
