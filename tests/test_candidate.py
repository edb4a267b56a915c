"""Candidate format: constructors, validation, save/load and hash stability."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from eep.candidate import Candidate, CandidateError


def test_identity_and_pruning_constructors():
    ident = Candidate.identity(num_layers=3, num_experts=8)
    assert ident.keep == 8 and ident.is_pure_pruning()
    assert all(torch.equal(m, torch.eye(8)) for m in ident.expert_merge)
    pruned = Candidate.from_kept([[3, 1], [0, 7], [5, 6]], 8)
    assert pruned.keep == 2 and pruned.kept_experts() == [[3, 1], [0, 7], [5, 6]]
    rand = Candidate.random_pruning(4, 8, keep=4, generator=3)
    assert rand.keep == 4 and rand.is_pure_pruning()
    assert all(len(set(k)) == 4 and k == sorted(k) for k in rand.kept_experts())
    assert Candidate.random_pruning(4, 8, 4, generator=3).content_hash() == rand.content_hash()


def test_round_trip_keeps_everything(tmp_path):
    g = torch.Generator().manual_seed(0)
    cand = Candidate(
        router_map=[torch.randn(4, 8, generator=g) for _ in range(3)],
        expert_merge=[torch.randn(4, 8, generator=g) for _ in range(3)],
        num_experts=8,
        top_k=1,
        router_mapping="logits",
        model_id="builtin:tiny-moe",
        phase="merge",
        parents=("c00001", "c00002"),
        id="c00003",
    )
    path = cand.save(tmp_path / "c.safetensors")
    back = Candidate.load(path)
    assert back.content_hash() == cand.content_hash()
    assert (back.top_k, back.router_mapping, back.model_id, back.phase, back.parents, back.id) == (
        1, "logits", "builtin:tiny-moe", "merge", ("c00001", "c00002"), "c00003")
    for a, b in zip(back.router_map + back.expert_merge, cand.router_map + cand.expert_merge, strict=True):
        assert torch.equal(a, b)
    assert path.read_bytes()[:8] != b"PK\x03\x04"  # safetensors, not a torch zip/pickle


def documented_hash(num_experts, top_k, mapping, layers, skip_thresholds=None) -> str:
    """The hash layout of docs/architecture.md ("Candidate"), from plain lists: no eep code."""
    h = hashlib.sha256(json.dumps([num_experts, top_k, mapping]).encode())
    if skip_thresholds is not None:
        h.update(json.dumps(skip_thresholds).encode())
    for router_map, expert_merge in layers:
        for rows in (router_map, expert_merge):
            h.update(f"({len(rows)}, {len(rows[0])})".encode())
            h.update(b"".join(struct.pack("<f", 0.0 if v == 0 else v) for row in rows for v in row))
    return h.hexdigest()[:20]


def one_hot(kept, num_experts):
    return [[1.0 if e == k else 0.0 for e in range(num_experts)] for k in kept]


def test_hash_follows_the_documented_layout():
    pruned = [one_hot([0, 1], 8), one_hot([2, 3], 8)]
    a = Candidate.from_kept([[0, 1], [2, 3]], 8)
    assert a.content_hash() == documented_hash(8, None, "probs", [(m, m) for m in pruned])
    # The value run directories hold; the layout above reproduces it.
    assert a.content_hash() == "3ea66d9e6d920936ba21"
    skipping = a.with_meta(extra={"skip_thresholds": [0.5, 0.25], "method": "naee"})
    assert skipping.content_hash() == documented_hash(8, None, "probs", [(m, m) for m in pruned], [0.5, 0.25])

    r = [[0.5, -0.0, -1.25], [0.1, 2.0, 0.0]]  # 0.1 is not a float32: its float32 rounding is hashed
    m = [[1.0, 0.0, 0.0], [-0.0, 0.3, 0.7]]
    merged = Candidate(
        router_map=[torch.tensor(r)], expert_merge=[torch.tensor(m)], num_experts=3, top_k=1,
        router_mapping="logits",
    )
    assert merged.content_hash() == documented_hash(3, 1, "logits", [(r, m)])


def test_hash_is_stable_and_ignores_metadata():
    a = Candidate.from_kept([[0, 1], [2, 3]], 8)
    # The hash must not change between releases (run directories rely on it).
    assert a.content_hash() == Candidate.from_kept([[0, 1], [2, 3]], 8, id="x", phase="prune").content_hash()
    assert a.content_hash() != Candidate.from_kept([[1, 0], [2, 3]], 8).content_hash()
    assert a.content_hash() != Candidate.from_kept([[0, 1], [2, 3]], 8, top_k=1).content_hash()
    skipping = a.with_meta(extra={"skip_thresholds": [0.5, 0.5]})
    assert skipping.content_hash() != a.content_hash()
    negzero = a.clone()
    negzero.expert_merge[0][0, 3] = -0.0
    assert negzero.content_hash() == a.content_hash()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(router_map=[torch.zeros(2, 8)], expert_merge=[torch.zeros(2, 7)]), "expected \\[keep, num_experts=8\\]"),
        (dict(router_map=[torch.zeros(2, 8)], expert_merge=[torch.zeros(3, 8)]), "must have the same shape"),
        (dict(router_map=[torch.full((2, 8), float("nan"))], expert_merge=[torch.zeros(2, 8)]), "NaN or inf"),
        (dict(router_map=[torch.zeros(2, 8)], expert_merge=[torch.full((2, 8), float("inf"))]), "NaN or inf"),
        (dict(router_map=[torch.zeros(9, 8)], expert_merge=[torch.zeros(9, 8)]), "keep=9 must be in 1..num_experts=8"),
        (dict(router_map=[torch.zeros(2, 8)], expert_merge=[]), "one of each per MoE layer"),
        (dict(router_map=[torch.zeros(2, 8)], expert_merge=[torch.zeros(2, 8)], router_mapping="x"), "router_mapping"),
        (dict(router_map=[torch.zeros(8)], expert_merge=[torch.zeros(8)]), "matrix"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(CandidateError, match=message):
        Candidate(num_experts=8, **kwargs)


def test_wrong_layer_count_for_model():
    cand = Candidate.from_kept([[0, 1]] * 3, 8)
    with pytest.raises(CandidateError, match="candidate has 3 MoE layers but the model has 32"):
        cand.validate(num_layers=32, num_experts=8)
    with pytest.raises(CandidateError, match="kept experts repeat"):
        Candidate.from_kept([[0, 0]], 8)
    with pytest.raises(CandidateError, match="outside 0..7"):
        Candidate.from_kept([[0, 8]], 8)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CandidateError, match="missing.safetensors: candidate file not found"):
        Candidate.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CandidateError, match="bad.safetensors"):
        Candidate.load(bad)
