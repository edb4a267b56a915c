"""Layer groups and the strategies' settings models."""

from __future__ import annotations

import pydantic
import pytest
import torch

from eep.search import (
    CoordinateDescentSettings,
    EEPSettings,
    GroupError,
    LayerGroups,
    RandomSearchSettings,
    StrategySettings,
)


def test_per_layer_groups():
    groups = LayerGroups.resolve("per_layer", 5)
    assert groups.num_groups == 5
    assert groups.members == [[0], [1], [2], [3], [4]]


def test_equal_groups_match_the_authors_four_by_eight():
    groups = LayerGroups.resolve(4, 32)
    assert groups.members == [list(range(s, s + 8)) for s in (0, 8, 16, 24)]
    assert groups.group_of(23) == 2 and groups.group_of(24) == 3


def test_uneven_groups_differ_by_at_most_one_layer():
    groups = LayerGroups.resolve(3, 8)
    assert [len(m) for m in groups.members] == [3, 3, 2]
    assert sum(groups.members, []) == list(range(8))


def test_explicit_ranges_are_inclusive():
    groups = LayerGroups.resolve([[0, 2], [3, 3], [4, 5]], 6)
    assert groups.members == [[0, 1, 2], [3], [4, 5]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([[0, 2], [2, 5]], "layer 2 is in group 0 and group 1"),
        ([[0, 2], [4, 5]], "layers [3] are in no group"),
        ([[0, 6]], "outside 0..5"),
        ([[3, 1], [0, 0], [4, 5]], "first <= last"),
        (0, "must be in 1..6"),
        (7, "must be in 1..6"),
        ("per_block", "per_layer"),
    ],
)
def test_bad_group_specs_say_what_is_wrong(spec, message):
    with pytest.raises(GroupError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LayerGroups.resolve(spec, 6)


def test_expand_copies_and_collapse_reads_back():
    groups = LayerGroups.resolve(2, 4)
    a, b = torch.eye(4)[:2], torch.eye(4)[2:]
    layers = groups.expand([a, b])
    assert [torch.equal(t, a) for t in layers] == [True, True, False, False]
    layers[0][0, 0] = 5.0  # each layer owns its tensor
    assert layers[1][0, 0] == 1.0 and a[0, 0] == 1.0
    with pytest.raises(GroupError, match="layers 0 and 1 differ but share group 0"):
        groups.collapse(layers)
    layers[0][0, 0] = 1.0
    back = groups.collapse(layers)
    assert torch.equal(back[0], a) and torch.equal(back[1], b)


def test_settings_defaults_are_the_authors():
    s = EEPSettings(keep=4)
    assert (s.init_population, s.discrete_iter, s.total_iter) == (31, 100, 400)
    assert (s.discrete_mutate_prob, s.crossover_prob, s.from_front_prob) == (0.15, 0.3, 0.6)
    assert (s.crossover_parents_select_type, s.crossover_parents_threshold) == ("absolute", 0.01)
    assert (s.crossover_parents_rank, s.mutate_parents_rank) == (6, 0)
    assert (s.mutate_parents_select_type, s.mutate_parents_threshold) == ("absolute", 0.03)
    assert (s.mutate_prob, s.mutate_scale, s.norm_prob) == (0.25, 0.065, 0.1)
    assert (s.weight_change_prob, s.transfer_change_prob) == (0.25, 0.25)
    assert "dev_top" not in EEPSettings.model_fields  # one dev re-ranking size: final.dev_top
    assert (s.groups, s.router_mapping, s.top_k) == ("per_layer", "probs", None)
    for name, field in EEPSettings.model_fields.items():
        assert field.description, f"{name} has no description"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 4, "mutate_prob": 1.5}, "mutate_prob"),
        ({"keep": 4, "top_k": 5}, "top_k=5 exceeds keep=4"),
        ({"keep": 4, "groups": [[0, 3], [3, 7]]}, "groups"),
        ({"keep": 4, "weight_change_prob": 0, "transfer_change_prob": 0}, "no group"),
        ({"keep": 4, "typo_field": 1}, "typo_field"),
        ({"keep": 0}, "keep"),
    ],
)
def test_settings_errors_name_the_field(kwargs, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        EEPSettings(**kwargs)


def test_settings_accept_yaml_shapes_and_pick_the_strategy_by_kind():
    adapter = pydantic.TypeAdapter(StrategySettings)
    eep = adapter.validate_python({"kind": "eep", "keep": 2, "groups": [[0, 7], [8, 15]]})
    assert isinstance(eep, EEPSettings) and eep.groups == [(0, 7), (8, 15)]
    assert isinstance(adapter.validate_python({"kind": "random", "keep": 2}), RandomSearchSettings)
    cd = adapter.validate_python({"kind": "coordinate_descent", "keep": 2, "groups": 4})
    assert isinstance(cd, CoordinateDescentSettings) and cd.groups == 4
    with pytest.raises(pydantic.ValidationError):
        adapter.validate_python({"kind": "random", "keep": 2, "total_iter": 5})
