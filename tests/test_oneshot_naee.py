"""NAEE enumeration against brute force: every subset really pruned with Surgery, block error measured."""

from __future__ import annotations

import itertools

import pytest
import torch

from eep.candidate import Candidate
from eep.models.families import moe_layers
from eep.models.surgery import Surgery
from eep.models.testing import tiny_model
from eep.oneshot.calibration import Calibration
from eep.oneshot.naee import NAEEError, kept_from_losses, naee_prune


def _calibration(pad: bool = True) -> Calibration:
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(3, 96, (9, 12), generator=g).tolist()
    if pad:
        rows = [r[: 6 + i % 7] for i, r in enumerate(rows)]  # ragged: padding must be ignored
    return Calibration.from_ids(rows, batch_size=3)


@torch.no_grad()
def _block_inputs(model, calibration, layer):
    """Per batch, layer `layer`'s block input [B, T, d] and the mask of real tokens."""
    block = moe_layers(model)[layer].block
    seen = []
    handle = block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )
    try:
        for batch in calibration:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        handle.remove()
    return [(x, b.attention_mask.reshape(-1).bool()) for x, b in zip(seen, calibration, strict=True)]


@torch.no_grad()
def _brute_force(model, inputs, targets, layer, kept_before, num_experts, keep):
    """Loss of every dropped set of `layer`: sum over batches of ||Z - pruned block(X)||_F."""
    surgery = Surgery(model)
    block = moe_layers(model)[layer].block
    num_layers = surgery.num_layers
    losses = {}
    for dropped in itertools.combinations(range(num_experts), num_experts - keep):
        kept = [e for e in range(num_experts) if e not in dropped]
        per_layer = [
            kept_before[i] if i < layer else (kept if i == layer else list(range(num_experts)))
            for i in range(num_layers)
        ]
        surgery.apply(Candidate.from_kept(per_layer, num_experts))
        loss = 0.0
        for (x, mask), z in zip(inputs, targets, strict=True):
            y = block(x).reshape(-1, x.shape[-1])[mask]
            loss += float((z.double() - y.double()).norm())
        losses[dropped] = loss
    surgery.restore()
    return losses


@torch.no_grad()
def _full_outputs(model, inputs, layer):
    block = moe_layers(model)[layer].block
    return [block(x).reshape(-1, x.shape[-1])[mask] for x, mask in inputs]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_layerwise_enumeration_is_the_brute_force_argmin(family):
    # qwen2_moe: no top-k renormalisation and a shared expert (cancels in the error).
    model = tiny_model(family, num_layers=2)
    calibration = _calibration()
    result = naee_prune(model, calibration, keep=4)
    assert result.methods == ["enumerate", "enumerate"] and result.passes == 1
    for layer in range(2):
        inputs = _block_inputs(model, calibration, layer)
        targets = _full_outputs(model, inputs, layer)
        brute = _brute_force(model, inputs, targets, layer, [list(range(8))] * layer, 8, 4)
        assert brute.keys() == result.losses[layer].keys()
        for dropped, loss in brute.items():
            assert result.losses[layer][dropped] == pytest.approx(loss, rel=1e-6, abs=1e-9)
        best = min(brute.values())
        chosen = tuple(e for e in range(8) if e not in result.kept[layer])
        assert brute[chosen] <= best + 1e-6 * best
        assert result.kept[layer] == kept_from_losses(result.losses[layer], 8)


def test_progressive_sees_pruned_inputs_against_unpruned_targets():
    model = tiny_model("mixtral", num_layers=2)
    calibration = _calibration()
    result = naee_prune(model, calibration, keep=4, order="progressive")
    layer = 1
    # Target: the unpruned model's block output on unpruned inputs.
    targets = _full_outputs(model, _block_inputs(model, calibration, layer), layer)
    # Inputs: the model with layer 0 pruned as chosen.
    surgery = Surgery(model)
    surgery.apply(Candidate.from_kept([result.kept[0], list(range(8))], 8))
    inputs = _block_inputs(model, calibration, layer)
    surgery.restore()
    brute = _brute_force(model, inputs, targets, layer, [result.kept[0]], 8, 4)
    for dropped, loss in brute.items():
        assert result.losses[layer][dropped] == pytest.approx(loss, rel=1e-6, abs=1e-9)
    chosen = tuple(e for e in range(8) if e not in result.kept[layer])
    assert brute[chosen] <= min(brute.values()) * (1 + 1e-6)
    # Layer 0 sees the same inputs in both orders.
    layerwise = naee_prune(model, calibration, keep=4)
    assert result.losses[0] == pytest.approx(layerwise.losses[0])


def test_ties_go_to_the_first_dropped_tuple():
    model = tiny_model("mixtral", num_layers=1)
    with torch.no_grad():
        # Gate rows (w, -w, v, -v, 0, 0, 0, 0): two of experts 0..3 always have a logit > 0, so
        # experts 4..7 (logit 0) are never routed while 0..3 are kept; dropping any two of them
        # leaves every token's routing unchanged, a loss of exactly 0.
        gate = moe_layers(model)[0].gate.weight
        gate[1], gate[3] = -gate[0], -gate[2]
        gate[4:] = 0
    result = naee_prune(model, _calibration(), keep=6)
    zero = [d for d, loss in result.losses[0].items() if loss == 0.0]
    assert zero == list(itertools.combinations(range(4, 8), 2))
    assert result.kept == [[0, 1, 2, 3, 6, 7]]  # dropped (4, 5): first in combinations order


def test_chunking_does_not_change_losses():
    model = tiny_model("mixtral", num_layers=1)
    calibration = _calibration()
    whole = naee_prune(model, calibration, keep=2)
    tiny = naee_prune(model, calibration, keep=2, memory_budget=3 * 8 * 64 * 12)  # 3-token chunks
    # Only BLAS rounding differs (expert outputs computed for 1 row vs many).
    assert tiny.losses[0] == pytest.approx(whole.losses[0], rel=1e-6)


def _replay_beam(losses: dict[tuple[int, ...], float], num_experts: int, drop: int, width: int):
    """The dropped set a beam search of `width` must end at, replayed from the losses it scored.

    Level by level, the sets scored must be exactly the one-expert extensions of the previous
    level's `width` best (ties: the lexicographically first), and nothing else.
    """
    beams: list[tuple[int, ...]] = [()]
    for level in range(1, drop + 1):
        grown = {tuple(sorted((*d, e))) for d in beams for e in range(num_experts) if e not in d}
        scored = {d: loss for d, loss in losses.items() if len(d) == level}
        assert scored.keys() == grown, f"level {level} scored other sets than the beam's extensions"
        beams = sorted(scored, key=lambda d: (scored[d], d))[:width]
    assert all(1 <= len(d) <= drop for d in losses)
    return beams[0]


def test_beam_search_for_many_experts():
    # Seed 10 is a layer where greedy (a beam of width 1) ends at the second best subset of
    # C(12, 4) and a beam of width 2 at the best: the two methods really differ here.
    model = tiny_model("mixtral", seed=10, num_layers=1, num_experts=12)
    calibration = _calibration(pad=False)
    exact = naee_prune(model, calibration, keep=8)  # C(12, 4) = 495 subsets
    assert exact.methods == ["enumerate"] and len(exact.losses[0]) == 495
    optimum = min(exact.losses[0].values())

    greedy = naee_prune(model, calibration, keep=8, max_subsets=10)
    assert greedy.methods == ["beam"] and greedy.passes == 4  # one pass per dropped expert
    dropped = tuple(e for e in range(12) if e not in greedy.kept[0])
    assert _replay_beam(greedy.losses[0], 12, 4, width=1) == dropped
    assert greedy.losses[0][dropped] == pytest.approx(exact.losses[0][dropped], rel=1e-9)
    assert greedy.losses[0][dropped] > optimum * (1 + 1e-6), "greedy found the optimum here"
    # A set's loss does not depend on the search that scored it: every level agrees with an
    # enumeration of that many dropped experts.
    for level in (1, 2, 3):
        enumerated = naee_prune(model, calibration, keep=12 - level).losses[0]
        at_level = {d: loss for d, loss in greedy.losses[0].items() if len(d) == level}
        assert at_level == pytest.approx({d: enumerated[d] for d in at_level}, rel=1e-9)

    beam = naee_prune(model, calibration, keep=8, max_subsets=10, beam_width=2)
    assert _replay_beam(beam.losses[0], 12, 4, width=2) == tuple(
        e for e in range(12) if e not in beam.kept[0]
    )
    assert beam.kept == exact.kept
    # A beam as wide as the level keeps every subset: the global optimum.
    wide = naee_prune(model, calibration, keep=8, max_subsets=10, beam_width=495)
    assert wide.kept == exact.kept


def test_one_beam_run_answers_for_every_larger_keep():
    """kept_at: the beam's best at each level on the way down equals a run that stops there."""
    model = tiny_model("mixtral", seed=10, num_layers=2, num_experts=12)
    calibration = _calibration(pad=False)
    deep = naee_prune(model, calibration, keep=7, max_subsets=10)
    assert deep.methods == ["beam", "beam"]
    for keep in (7, 8, 9, 10, 11):
        alone = naee_prune(model, calibration, keep=keep, max_subsets=10)
        assert [deep.kept_at(layer, keep) for layer in range(2)] == alone.kept
    assert deep.kept_at(0, 6) is None  # below the run's keep: never scored
    exact = naee_prune(model, calibration, keep=8)  # an enumeration scores its own keep only
    assert exact.kept_at(0, 8) == exact.kept[0] and exact.kept_at(0, 9) is None


def test_candidate_and_unsupported_router():
    model = tiny_model("mixtral", num_layers=2)
    result = naee_prune(model, _calibration(), keep=4)
    cand = result.candidate("tiny")
    assert cand.phase == "oneshot" and cand.extra["method"] == "naee"
    assert cand.kept_experts() == result.kept and cand.is_pure_pruning()
    Surgery(model).check(cand)
    with pytest.raises(NAEEError, match="sigmoid"):
        naee_prune(tiny_model("deepseek_v3"), _calibration(pad=False), keep=4)
    with pytest.raises(NAEEError, match="keep"):
        naee_prune(model, _calibration(), keep=1)
