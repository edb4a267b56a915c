"""Gradient polishing (eep.polish, `eep polish`) on the built-in tiny model."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from eep.candidate import Candidate
from eep.cli import main
from eep.config import PolishSettings
from eep.export import export_model
from eep.fitness import Evaluator
from eep.models.loading import load_model
from eep.models.surgery import Surgery
from eep.models.testing import tiny_model
from eep.oneshot import parse_calibration
from eep.polish import (
    TUNABLE,
    CalibrationRows,
    DifferentiableCandidate,
    frozen,
    keep_polished,
    polish_on_calibration,
    polish_on_split,
    tuned_kinds,
)
from eep.tasks.registry import resolve_task

ROWS = 32  # search examples polished on


@pytest.fixture(scope="module")
def loaded():
    return load_model("builtin:tiny-moe", "cpu", "float32")


@pytest.fixture(scope="module")
def search(loaded):
    """The task metric's evaluator: polishing builds its own KL rows beside it."""
    return Evaluator(loaded, "add", "search", max_examples=ROWS)


def pruned(seed: int = 3, **meta) -> Candidate:
    """A random keep-2 pruning: clearly worse than the full model on the tiny one."""
    return Candidate.random_pruning(4, 8, 2, generator=seed, **meta)


def noisy(base: Candidate, mapping: str, seed: int = 1) -> Candidate:
    """A merge candidate near `base`: every entry of R and M moved a little."""
    g = torch.Generator().manual_seed(seed)

    def jitter(ms):
        return [m + 0.05 * torch.randn(m.shape, generator=g) for m in ms]

    return Candidate(jitter(base.router_map), jitter(base.expert_merge), 8, router_mapping=mapping)


def kl_of(loaded, candidate: Candidate) -> float:
    """The `kl` fitness of a fresh evaluator on the same rows (its own reference)."""
    return -Evaluator(loaded, "add", "search", max_examples=ROWS, fitness="kl").evaluate(candidate).score


def test_polishing_lowers_the_kl_and_the_kl_fitness_reproduces_it(loaded, search):
    original = pruned(id="seed-3")
    before_score = search.evaluate(original).score
    out = polish_on_split(search, original, PolishSettings(steps=40, lr=0.01, seed=0))
    assert out.improved and out.steps == 40 and len(out.history) == 40
    assert out.kl_after < 0.75 * out.kl_before, (out.kl_before, out.kl_after)
    assert kl_of(loaded, original) == pytest.approx(out.kl_before, abs=1e-4)
    assert kl_of(loaded, out.candidate) == pytest.approx(out.kl_after, abs=1e-4)
    polished = out.candidate
    assert polished.phase == "polish" and polished.parents == ("seed-3",)
    assert polished.keep_per_layer == [2] * 4 and polished.router_mapping == "probs"
    record = polished.extra["polish"]
    assert record["steps"] == 40 and record["kl_after"] == out.kl_after and record["lr"] == 0.01
    assert out.tuned == TUNABLE and not polished.is_pure_pruning()
    # The accuracy evaluator polishing ran beside still scores as before.
    assert search.evaluate(original).score == before_score


def test_a_worse_result_gives_the_original_back(search):
    original = pruned()
    # Huge steps on M: experts scaled far off their weights.
    out = polish_on_split(search, original, PolishSettings(steps=3, lr=5.0, tune=["merge"]))
    assert not out.improved and out.kl_polished > out.kl_before
    assert out.candidate is original and out.kl_after == out.kl_before
    assert out.polished is not None and out.polished.phase == "polish"


@pytest.mark.parametrize("kind", ["probs", "logits", "onehot"])
@pytest.mark.parametrize("tune", [TUNABLE, ("merge",), ("router",)])
def test_step_zero_computes_the_evaluators_logits(loaded, kind, tune):
    base = pruned()
    candidate = base if kind == "onehot" else noisy(base, kind)
    evaluator = Evaluator(loaded, "add", "search", max_examples=16, fitness="kl", batch_size=16)
    batch = evaluator._batches[0]
    evaluator.surgery.apply(candidate)
    with torch.inference_mode():
        want = evaluator._full_logits(batch)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    with frozen(evaluator.surgery):
        coefficients = DifferentiableCandidate(evaluator.surgery, candidate, tune)
        got = coefficients.logits(inputs)
        got.square().mean().backward()
    if kind == "onehot" and "router" in tune:
        # The mapped router (softmax over all E, then R) instead of the sliced gate: rounding.
        assert float((got - want).abs().max().detach()) < 1e-4
    else:
        assert torch.equal(got, want)
    # Gradients reach every tuned matrix (through the top-k weights for R), nothing else.
    leaves = coefficients.parameters()
    assert len(leaves) == 4 * len(tune)
    assert all(t.grad is not None and float(t.grad.abs().sum()) > 0 for t in leaves)
    evaluator.surgery.restore()


def test_only_the_coefficients_change(loaded, search):
    model = loaded.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for candidate in (pruned(), noisy(pruned(), "logits")):
        polish_on_split(search, candidate, PolishSettings(steps=3, lr=0.01))
        # Polishing leaves the full model in place; restoring again changes nothing.
        for restore in (False, True):
            if restore:
                search.surgery.restore()
            after = dict(model.named_parameters())
            assert after.keys() == before.keys()
            for name, p in after.items():
                assert torch.equal(p, before[name]), name
                assert p.grad is None, name
                assert p.requires_grad == flags[name], name
                assert not p.is_inference(), name


def test_per_layer_keep_polishes_and_keeps_its_shapes(loaded, search):
    original = Candidate.from_kept([[0], [1, 2], [3, 4, 5], [6, 7]], 8)
    out = polish_on_split(search, original, PolishSettings(steps=15, lr=0.01))
    assert out.kl_polished < out.kl_before
    assert out.polished.keep_per_layer == [1, 2, 3, 2]
    assert [t.shape for t in out.polished.router_map] == [t.shape for t in original.router_map]
    assert kl_of(loaded, out.polished) == pytest.approx(out.kl_polished, abs=1e-4)


def test_tuning_merge_only_leaves_r_unchanged(search):
    for original in (pruned(), noisy(pruned(), "probs")):
        out = polish_on_split(search, original, PolishSettings(steps=5, lr=0.01, tune=["merge"]))
        assert out.tuned == ("merge",)
        for r0, r1, m0, m1 in zip(original.router_map, out.polished.router_map,
                                  original.expert_merge, out.polished.expert_merge, strict=True):
            assert torch.equal(r0, r1)
            assert not torch.equal(m0, m1)


def test_probs_mode_r_gets_no_new_negative_entries(search):
    start = noisy(pruned(), "probs", seed=4)  # some entries start below 0
    out = polish_on_split(search, start, PolishSettings(steps=8, lr=0.05, tune=["router"]))
    assert any(float(r.min()) < 0 for r in start.router_map)
    for r0, r1 in zip(start.router_map, out.polished.router_map, strict=True):
        assert bool((r1 >= r0.clamp(max=0)).all())
        assert not torch.equal(r0, r1)
    logits = noisy(pruned(), "logits", seed=4)  # gate rows R @ G: any sign is fine there
    out = polish_on_split(search, logits, PolishSettings(steps=8, lr=0.05, tune=["router"]))
    assert any(bool((r1 < r0.clamp(max=0)).any()) for r0, r1 in
               zip(logits.router_map, out.polished.router_map, strict=True))


def test_sigmoid_routers_tune_merge_only_in_probs_mode():
    surgery = Surgery(tiny_model("deepseek_v3"))
    onehot = Candidate.from_kept([[0, 1, 2, 3]] * surgery.num_layers, surgery.num_experts)
    assert tuned_kinds(surgery, onehot, ["merge", "router"]) == ("merge",)
    with pytest.raises(ValueError, match=r"polish tune=\['router'\].*sigmoid"):
        tuned_kinds(surgery, onehot, ["router"])
    logits = onehot.with_meta(router_mapping="logits")
    assert tuned_kinds(surgery, logits, ["router"]) == ("router",)


def test_calibration_rows_measure_the_kl_of_each_text_alone(loaded):
    rows = CalibrationRows(loaded, parse_calibration("builtin", samples=12), kl_top=1000, batch_size=5)
    candidate = pruned()
    got = rows.mean_kl(candidate)  # batches of 5 left-padded rows
    surgery = rows.surgery
    by_hand = []
    with torch.no_grad():
        for ids in rows.rows:
            x = torch.tensor([ids])
            surgery.apply(candidate)
            q = torch.log_softmax(loaded.model(x).logits[0, :-1].double(), dim=-1)
            surgery.restore()
            p = torch.log_softmax(loaded.model(x).logits[0, :-1].double(), dim=-1)
            by_hand.append(float((p.exp() * (p - q)).sum(-1).mean()))
    assert len(by_hand) == 12 and len({len(r) for r in rows.rows}) > 1  # padding happens
    assert got == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


def test_calibration_text_polishes(loaded):
    spec = parse_calibration("builtin", samples=24)
    settings = PolishSettings(steps=10, lr=0.01, batch_size=8, tune=["merge"])
    out = polish_on_calibration(loaded, pruned(), spec, settings)
    assert out.improved and out.kl_after < out.kl_before
    assert out.candidate.phase == "polish"


def test_polished_candidate_exports_with_identical_logits(loaded, search, tmp_path):
    out = polish_on_split(search, pruned(), PolishSettings(steps=5, lr=0.01))
    candidate = out.polished
    assert not candidate.router_has_stock_equivalent()  # a mapped checkpoint
    report = export_model("builtin:tiny-moe", candidate, tmp_path / "out")
    assert not report.stock
    tokens = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(5))
    search.surgery.apply(candidate)
    with torch.no_grad():
        want = loaded.model(tokens).logits
    search.surgery.restore()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(tokens).logits
    assert float((got - want).abs().max()) <= 1e-5
    assert Candidate.load(tmp_path / "out" / "eep_candidate.safetensors").content_hash() == candidate.content_hash()


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def small_add(tmp_path_factory) -> str:
    """Task `add` with small splits, as a task file."""
    spec = resolve_task("add").model_dump(mode="json")
    spec["splits"] = {"search": 24, "dev": 24, "test": 8, "seed": 0}
    path = tmp_path_factory.mktemp("task") / "add.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_keep_rule():
    """(dev score, then KL): a better dev score wins; equal ones go to the lower KL."""
    assert keep_polished(0.5, 0.75, kl_lowered=True) and keep_polished(0.5, 0.75, kl_lowered=False)
    assert keep_polished(0.5, 0.5, kl_lowered=True)
    assert not keep_polished(0.5, 0.5, kl_lowered=False)
    assert not keep_polished(0.5, 0.4375, kl_lowered=True)


@pytest.mark.parametrize("dev_says", [True, False])
def test_cli_writes_what_the_dev_rule_chooses(tmp_path, small_add, capsys, monkeypatch, dev_says):
    monkeypatch.setattr("eep.cli.polish.keep_polished", lambda before, after, lowered: dev_says)
    source = pruned(id="orig").save(tmp_path / "c.safetensors")
    out = tmp_path / "p.safetensors"
    argv = ["polish", "--model", "builtin:tiny-moe", "--candidate", str(source), "--task", small_add,
            "--out", str(out), "--steps", "10", "--lr", "0.01", "--batch-size", "8", "--tune", "merge"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "KL(full || candidate) on add [search], 24 rows: " in printed
    assert "polish: 10 steps" in printed and "dev exact_match: " in printed
    written = Candidate.load(out)
    if dev_says:
        assert "kept the polished candidate" in printed
        assert written.phase == "polish" and written.parents == ("orig",)
        assert "polish" in written.extra
    else:
        assert "below the original, wrote the original candidate unchanged" in printed
        assert written.content_hash() == pruned().content_hash() and written.id == "orig"


def test_cli_calibration(tmp_path, capsys):
    source = pruned().save(tmp_path / "c.safetensors")
    out = tmp_path / "p.safetensors"
    argv = ["polish", "--model", "builtin:tiny-moe", "--candidate", str(source), "--calibration",
            "builtin", "--samples", "16", "--out", str(out), "--steps", "5", "--tune", "merge"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tuned merge," in printed and "calibration builtin" in printed
    written = Candidate.load(out)
    assert written.phase == "polish" and written.router_map[0].equal(pruned().router_map[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--steps": "0"}, "--steps: input should be greater than or equal to 1"),
        ({"--lr": "-1"}, "--lr: input should be greater than 0"),
        ({"--tune": "merge,gate"}, "--tune: input should be 'merge' or 'router'"),
        ({"--candidate": "missing.safetensors"}, "missing.safetensors: candidate file not found"),
        ({"--model": "builtin:deep-moe"}, "--candidate c.safetensors: candidate has 4 MoE layers but the model has 16"),
        ({"--samples": "4"}, "--samples goes with --calibration"),
    ],
)
def test_cli_errors_name_the_argument(tmp_path, small_add, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    pruned().save("c.safetensors")
    args = {"--model": "builtin:tiny-moe", "--candidate": "c.safetensors", "--task": small_add,
            "--out": "p.safetensors", **change}
    assert main(["polish", *[x for kv in args.items() for x in kv]]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any weight-loading progress bar
    assert last.startswith("eep polish: error: ") and message in last, last
