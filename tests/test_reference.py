"""Import of the EEP authors' coefficient files: key grammar, layouts, safety, and applying them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from eep.candidate import Candidate, CandidateError
from eep.cli import main
from eep.models.routing import ProbabilityMappedRouter
from eep.models.surgery import Surgery
from eep.models.testing import tiny_config, tiny_model
from eep.reference import import_reference, pattern_matches, read_reference, resolve_layer

# Files in the authors' format (our values; the README there says where the format comes from).
FORMAT_DIR = Path(__file__).parent / "fixtures" / "eep_searched_coeff"
KEEP, E, LAYERS = 4, 8, 32
GROUPS_4 = ("[0-7]", "[8-15]", "[16-23]")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a shared 2-core machine 2 threads ran ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def near_one_hot(seed: int, keep: int = KEEP) -> torch.Tensor:
    """Rows like the authors' files: a dominant entry near 1, small +- entries, unnormalised."""
    g = torch.Generator().manual_seed(seed)
    dominant = torch.randperm(E, generator=g)[:keep]
    m = 0.1 * torch.randn(keep, E, generator=g)
    m[torch.arange(keep), dominant] = 1.0 + 0.1 * torch.randn(keep, generator=g)
    return m


def four_group() -> OrderedDict:
    d = OrderedDict()
    for n, spec in enumerate(GROUPS_4):
        d[f"layers.{spec}"] = near_one_hot(n)
    d["others"] = near_one_hot(3)
    for n, spec in enumerate(GROUPS_4):
        d[f"transfer.{spec}"] = near_one_hot(10 + n)
    d["others_transfer"] = near_one_hot(13)
    return d


def per_layer(interleaved: bool = False) -> OrderedDict:
    merge = [(f"layers.{layer}", near_one_hot(100 + layer)) for layer in range(LAYERS - 1)]
    router = [(f"transfer.{layer}", near_one_hot(200 + layer)) for layer in range(LAYERS - 1)]
    others, others_transfer = ("others", near_one_hot(131)), ("others_transfer", near_one_hot(231))
    if interleaved:
        pairs = [item for pair in zip(merge, router, strict=True) for item in pair]
        return OrderedDict([*pairs, others, others_transfer])
    return OrderedDict([*merge, others, *router, others_transfer])


def expected_keys(layout: str, layer: int) -> tuple[str, str]:
    """Hand-written resolution: (merging key, router key) of a layer."""
    if layout == "4-group":
        if layer >= 24:
            return "others", "others_transfer"
        spec = GROUPS_4[layer // 8]
        return f"layers.{spec}", f"transfer.{spec}"
    if layer == LAYERS - 1:
        return "others", "others_transfer"
    return f"layers.{layer}", f"transfer.{layer}"


def save(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------- key grammar
@pytest.mark.parametrize(
    ("text", "pattern", "want"),
    [
        ("model.layers.1.block_sparse_moe.experts.3.w1.weight", "layers.1", True),
        ("model.layers.10.block_sparse_moe.experts.1.w1.weight", "layers.1", False),
        ("model.layers.11.block_sparse_moe.experts.1.w1.weight", "layers.1", False),
        ("model.layers.3.block_sparse_moe.experts.1.w1.weight", "layers.1", False),  # experts.1
        ("model.layers.7.block_sparse_moe.experts.0.w1.weight", "layers.[0-7]", True),
        ("model.layers.8.block_sparse_moe.experts.0.w1.weight", "layers.[0-7]", False),
        ("model.layers.16.block_sparse_moe.experts.0.w1.weight", "layers.[8-15]", False),
        ("model.layers.07.block_sparse_moe.experts.0.w1.weight", "layers.[0-7]", False),
        ("model.layers.5.block_sparse_moe.experts.0.w1.weight", "layers.*", True),
        ("model.layers.5.block_sparse_moe.experts.0.w1.weight", "*.5.block_sparse_moe", True),
        ("model.layers.5.block_sparse_moe.experts.0.w1.weight", "others", False),
        ("transfer.1", "transfer.1", True),
        ("transfer.10", "transfer.1", False),
        ("transfer.23", "transfer.[16-23]", True),
        ("transfer.24", "transfer.[16-23]", False),
        ("transfer.3", "others_transfer", False),
        ("transfer.3", "transfer.3.extra", False),  # a pattern longer than the text
    ],
)
def test_pattern_matches_whole_tokens(text, pattern, want):
    assert pattern_matches(text, pattern) is want


def test_layers_1_does_not_take_layers_10_and_11():
    keys = ["layers.1", "others", "transfer.1", "others_transfer"]
    assert resolve_layer(keys, 1, KEEP).expert_merge == ("layers.1",) * KEEP
    for layer in (10, 11, 21):
        resolved = resolve_layer(keys, layer, KEEP)
        assert resolved.expert_merge == ("others",) * KEEP
        assert resolved.router_map == "others_transfer"


def test_first_match_in_dict_order_wins():
    keys = ["layers.[0-3]", "layers.2", "others", "transfer.2", "transfer.[0-3]", "others_transfer"]
    assert resolve_layer(keys, 2, KEEP).expert_merge == ("layers.[0-3]",) * KEEP
    assert resolve_layer(keys, 2, KEEP).router_map == "transfer.2"
    assert resolve_layer(keys, 3, KEEP).router_map == "transfer.[0-3]"


def test_slots_resolve_on_their_own_parameter_names():
    # The authors match each expert's parameter name: a key naming experts takes only those slots.
    keys = ["layers.0.block_sparse_moe.experts.[0-1]", "others", "others_transfer"]
    got = resolve_layer(keys, 0, KEEP).expert_merge
    assert got == ("layers.0.block_sparse_moe.experts.[0-1]",) * 2 + ("others",) * 2
    assert resolve_layer(keys, 1, KEEP).expert_merge == ("others",) * KEEP


def test_key_splitting_expert_weights_is_refused():
    with pytest.raises(ValueError, match="w1/w2/w3 resolve to different keys"):
        resolve_layer(["w1", "others", "others_transfer"], 0, KEEP)


# ------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize(
    ("make", "layout", "order"),
    [
        (four_group, "4-group", "M then R"),
        (per_layer, "per-layer", "M then R"),
        (lambda: per_layer(interleaved=True), "per-layer", "interleaved"),
    ],
    ids=["4-group", "per-layer-M-then-R", "per-layer-interleaved"],
)
def test_layouts_resolve_per_layer_as_written(tmp_path, make, layout, order):
    coeff = make()
    path = save(tmp_path, "task_budget_4.pth", coeff)
    cand, notes = import_reference(path)
    assert cand.num_layers == LAYERS and cand.keep == KEEP and cand.num_experts == E
    assert cand.router_mapping == "probs" and cand.phase == "reference" and cand.top_k is None
    assert cand.extra["source"] == "task_budget_4.pth"
    assert cand.extra["layout"] == layout and cand.extra["key_order"] == order
    assert any("assumed 32" in n for n in notes)
    for layer in range(LAYERS):
        merge_key, router_key = expected_keys(layout, layer)
        # Rows exactly as in the file: no normalisation, no re-ordering of slots.
        assert torch.equal(cand.expert_merge[layer], coeff[merge_key]), layer
        assert torch.equal(cand.router_map[layer], coeff[router_key]), layer
        assert cand.extra["groups"]["expert_merge"][layer] == merge_key
        assert cand.extra["groups"]["router_map"][layer] == router_key


def test_archive_record_tuple_keeps_scores(tmp_path):
    coeff = four_group()
    path = save(tmp_path, "rte_budget_4.pth", (coeff, ("accuracy", 75.2), [("accuracy", 76.173)]))
    cand, notes = import_reference(path, num_layers=LAYERS)
    assert torch.equal(cand.expert_merge[0], coeff["layers.[0-7]"])
    assert cand.extra["scores"] == {
        "search": {"metric": "accuracy", "value": 75.2},
        "eval": [{"metric": "accuracy", "value": 76.173}],
    }
    assert not any("assumed" in n for n in notes)
    two = save(tmp_path, "two.pth", (coeff, ("old_score", 76.0)))
    assert read_reference(two).scores == {"search": {"metric": "old_score", "value": 76.0}}


def test_fewer_layers_reports_unused_keys(tmp_path):
    cand, notes = import_reference(save(tmp_path, "f.pth", per_layer()), num_layers=3)
    assert cand.num_layers == 3
    assert torch.equal(cand.expert_merge[2], per_layer()["layers.2"])
    assert "layers.30" in cand.extra["unused_keys"] and any("deeper model" in n for n in notes)


def test_saved_candidate_round_trips_through_cli(tmp_path, capsys):
    src = save(tmp_path, "squad_budget_4.pth", four_group())
    out = tmp_path / "c.safetensors"
    assert main(["import-reference", str(src), "--out", str(out), "--top-k", "1"]) == 0
    printed = capsys.readouterr().out
    assert "4-group layout" in printed and "assumed 32" in printed
    loaded = Candidate.load(out)
    direct, _ = import_reference(src, top_k=1)
    assert loaded.content_hash() == direct.content_hash()
    assert loaded.phase == "reference" and loaded.top_k == 1
    assert loaded.extra["source"] == "squad_budget_4.pth" and loaded.extra["layout"] == "4-group"


def test_model_config_gives_decoder_indices_and_checks_experts(tmp_path):
    coeff_path = save(tmp_path, "f.pth", per_layer())
    # DeepSeek-V2 tiny: layer 0 is dense, so the MoE layers are decoder layers 1 and 2.
    model_dir = tmp_path / "ds"
    tiny_config("deepseek_v2", num_experts=8).save_pretrained(model_dir)
    cand, notes = import_reference(coeff_path, model=str(model_dir))
    assert cand.num_layers == 2 and cand.model_id == str(model_dir) and not any("assumed" in n for n in notes)
    assert torch.equal(cand.expert_merge[0], per_layer()["layers.1"])
    assert torch.equal(cand.router_map[1], per_layer()["transfer.2"])
    four = tmp_path / "four"
    tiny_config("mixtral", num_experts=4).save_pretrained(four)
    with pytest.raises(CandidateError, match="8 experts per layer but the model has 4"):
        import_reference(coeff_path, model=str(four))
    with pytest.raises(ValueError, match="--num-layers 5 disagrees"):
        import_reference(coeff_path, model=str(model_dir), num_layers=5)


# ------------------------------------------------------------------------------- errors
class _Payload:
    """Unpickling this would call _touch; weights_only must refuse it before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).write_text("executed")


def test_pickled_objects_are_refused_and_not_executed(tmp_path):
    marker = tmp_path / "marker"
    path = save(tmp_path, "evil.pth", {"layers.[0-7]": _Payload(marker)})
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True"):
        read_reference(path)
    assert not marker.exists()
    # The payload is live: a plain unpickling would have run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "executed"


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([torch.zeros(4, 8)], "tuple must be an archive record"),
        (torch.zeros(4, 8), "expected a non-empty dict"),
        ({}, "expected a non-empty dict"),
        ({"layers.0": torch.zeros(8)}, "'layers.0' must be a 2-D"),
        ({"layers.0": [1.0, 2.0]}, "must be a 2-D"),
        ({"layers.0": torch.zeros(4, 8), "others": torch.zeros(2, 8)}, "inconsistent shapes"),
        ({"layers.0": torch.zeros(4, 8), "others": torch.zeros(4, 6)}, "inconsistent shapes"),
        ({"layers.[0-x]": torch.zeros(4, 8)}, "range must be written"),
        ({"layers.0": torch.zeros(4, 8, dtype=torch.int64)}, "floating point"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, obj, match):
    path = save(tmp_path, "bad.pth", obj)
    with pytest.raises(ValueError, match=match) as info:
        read_reference(path)
    assert "bad.pth" in str(info.value)


def test_missing_fallbacks_name_the_layer(tmp_path):
    no_others = OrderedDict((k, v) for k, v in per_layer().items() if k != "others")
    with pytest.raises(ValueError, match=r"layer 31: no merging .* 'others' fallback"):
        import_reference(save(tmp_path, "a.pth", no_others))
    no_router = OrderedDict((k, v) for k, v in per_layer().items() if k != "others_transfer")
    with pytest.raises(ValueError, match=r"a.pth|b.pth") as info:
        import_reference(save(tmp_path, "b.pth", no_router))
    assert "layer 31: no router" in str(info.value)


def test_not_a_torch_zip_and_missing_file(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: not a PyTorch zip"):
        read_reference(text)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_reference(tmp_path / "nope.pth")
    assert main(["import-reference", str(text), "--out", str(tmp_path / "o.safetensors")]) == 2


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    path = save(tmp_path, "bad.pth", {"layers.0": torch.zeros(8)})
    assert main(["import-reference", str(path), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "bad.pth" in capsys.readouterr().err


# ------------------------------------------------------------------------------- applying
@pytest.fixture(scope="module")
def mixtral32():
    return tiny_model("mixtral", num_layers=LAYERS)


def check_applied(model, cand: Candidate, coeff: OrderedDict, layout: str) -> None:
    """Apply `cand` and check it computes the file's matrices layer by layer."""
    from eep.models.families import moe_layers

    originals = [
        (moe.experts.gate_up_proj.detach().clone(), moe.experts.down_proj.detach().clone())
        for moe in moe_layers(model)
    ]
    surgery = Surgery(model)
    surgery.apply(cand)
    try:
        for layer, (gate_up, down) in enumerate(originals):
            merge_key, router_key = expected_keys(layout, layer)
            m, r = coeff[merge_key], coeff[router_key]
            block = surgery.layers[layer]
            assert block.experts.gate_up_proj.shape[0] == KEEP
            want_gate_up = torch.einsum("ij,j...->i...", m, gate_up)
            want_down = torch.einsum("ij,j...->i...", m, down)
            torch.testing.assert_close(block.experts.gate_up_proj, want_gate_up, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(block.experts.down_proj, want_down, rtol=1e-5, atol=1e-6)
            router = block.block.gate
            assert isinstance(router, ProbabilityMappedRouter)
            assert torch.equal(router.router_map, r)
        with torch.no_grad():
            logits = model(torch.tensor([[5, 6, 7, 8]])).logits
        assert torch.isfinite(logits).all()
    finally:
        surgery.restore()


def test_apply_file_rows_to_32_layer_mixtral(tmp_path, mixtral32):
    coeff = four_group()
    cand, _ = import_reference(save(tmp_path, "f.pth", coeff))
    check_applied(mixtral32, cand, coeff, "4-group")


def test_merged_row_sums_equal_the_files_for_every_layer_and_slot(tmp_path):
    # With all experts of a layer equal to one tensor W (different per layer), slot i becomes
    # (sum_j M[i, j]) W: the row sums of what the file says, unnormalised, layer by layer.
    model = tiny_model("mixtral", num_layers=LAYERS)
    from eep.models.families import moe_layers

    with torch.no_grad():
        for layer in moe_layers(model):
            layer.experts.gate_up_proj.copy_(layer.experts.gate_up_proj[:1].expand_as(layer.experts.gate_up_proj))
            layer.experts.down_proj.copy_(layer.experts.down_proj[:1].expand_as(layer.experts.down_proj))
    base = [layer.experts.down_proj[0].detach().clone() for layer in moe_layers(model)]
    coeff = per_layer(interleaved=True)
    cand, _ = import_reference(save(tmp_path, "f.pth", coeff))
    surgery = Surgery(model)
    surgery.apply(cand)
    for layer in range(LAYERS):
        merge_key, _ = expected_keys("per-layer", layer)
        file_sums = coeff[merge_key].sum(dim=1)
        assert not torch.allclose(file_sums, torch.ones(KEEP))  # really unnormalised rows
        down = surgery.layers[layer].experts.down_proj
        for slot in range(KEEP):
            ratio = (down[slot] / base[layer]).flatten()
            torch.testing.assert_close(ratio, file_sums[slot].expand_as(ratio), rtol=1e-4, atol=1e-5)


def test_32_layer_candidate_on_3_layer_model_is_refused(tmp_path):
    cand, _ = import_reference(save(tmp_path, "f.pth", four_group()))
    surgery = Surgery(tiny_model("mixtral"))
    with pytest.raises(CandidateError, match="32 MoE layers but the model has 3"):
        surgery.apply(cand)


# ------------------------------------------------------------------------------- real files
@pytest.mark.parametrize("layout", ["4-group", "per-layer"])
def test_authors_format_files(layout, mixtral32):
    path = FORMAT_DIR / ("four_group_budget_4.pth" if layout == "4-group" else "per_layer_budget_4.pth")
    coeff = torch.load(path, map_location="cpu", weights_only=True)
    if layout == "4-group":
        want_keys = [*(f"layers.{s}" for s in GROUPS_4), "others", *(f"transfer.{s}" for s in GROUPS_4), "others_transfer"]
    else:
        want_keys = [*(f"layers.{i}" for i in range(31)), "others", *(f"transfer.{i}" for i in range(31)), "others_transfer"]
    assert list(coeff) == want_keys
    cand, _ = import_reference(path)
    assert (cand.num_layers, cand.keep, cand.num_experts) == (LAYERS, 4, 8)
    assert cand.extra["layout"] == layout and cand.extra["key_order"] == "M then R"
    for layer in range(LAYERS):
        merge_key, router_key = expected_keys(layout, layer)
        assert torch.equal(cand.expert_merge[layer], coeff[merge_key])
        assert torch.equal(cand.router_map[layer], coeff[router_key])
    if layout == "4-group":
        # The dominant merging experts of the authors' squad_budget_4.pth, which the fixture copies.
        assert [sorted(cand.kept_experts()[layer]) for layer in (0, 8, 16, 24)] == [
            [0, 3, 6, 7], [0, 2, 5, 7], [1, 4, 5, 7], [0, 1, 2, 6],
        ]
    check_applied(mixtral32, cand, coeff, layout)
