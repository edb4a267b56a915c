"""Every export writes a model card and a recipe; `eep export --recipe` rebuilds the same bytes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from eep.builtin.tokenizer import build_tokenizer
from eep.candidate import Candidate
from eep.cli import main
from eep.export import CANDIDATE_FILE, export_model
from eep.model_card import ExportFacts, render_card
from eep.models.testing import tiny_model
from eep.recipe import RECIPE_FILE, Recipe
from eep.summary import fmt_score, method_rows


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny random Mixtral (3 MoE layers, 8 experts) with the built-in tokenizer."""
    path = tmp_path_factory.mktemp("base") / "tiny-mixtral"
    tokenizer = build_tokenizer()
    tiny_model("mixtral", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def merged_candidate() -> Candidate:
    """A `probs`-mode merge (mixed router rows): exported with eep's mapped model class."""
    g = torch.Generator().manual_seed(3)
    base = Candidate.from_kept([[0, 3, 5, 6]] * 3, 8, phase="merge", id="eep-00042")
    return Candidate(
        router_map=[r + 0.05 * torch.randn(r.shape, generator=g) for r in base.router_map],
        expert_merge=[m + 0.05 * torch.randn(m.shape, generator=g) for m in base.expert_merge],
        num_experts=8,
        router_mapping="probs",
        phase="merge",
        id="eep-00042",
    )


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("kind", ["prune", "merge"])
def test_recipe_rebuilds_the_same_bytes(base, tmp_path, capsys, kind):
    cand = Candidate.from_kept([[1, 2, 4, 7]] * 3, 8) if kind == "prune" else merged_candidate()
    export_model(base, cand, tmp_path / "a")
    recipe = tmp_path / "a" / RECIPE_FILE
    assert main(["export", "--recipe", str(recipe), "--out", str(tmp_path / "b")]) == 0
    assert "README.md" in capsys.readouterr().out
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert {"README.md", RECIPE_FILE, CANDIDATE_FILE, "config.json"} <= set(a)
    assert list(a) == list(b)
    assert [name for name in a if a[name] != b[name]] == []
    loaded = Recipe.from_yaml(recipe)
    assert loaded.base_model == base and loaded.candidate_hash == cand.content_hash()
    assert loaded.campaign is None and loaded.results is None


def test_card_of_a_plain_export(base, tmp_path):
    export_model(base, merged_candidate(), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert {"eep", "moe", "pruning", "expert-merging", "mixtral"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is not a hub id
    assert f"| Base model | `{base}` |" in card
    assert "| Family | `mixtral` |" in card
    assert "| Experts per MoE layer | 4 of 8 kept, top-2 |" in card
    assert "`eep_mixtral`, needs `import eep`" in card and "import eep  # registers" in card
    assert "EEP (merging phase) (expert merging)" in card
    assert "## Results" not in card  # no campaign, no test table
    assert str(tmp_path) not in card  # nothing about where it was written


def test_card_names_one_shot_methods_hub_bases_and_kept_experts():
    cand = Candidate.from_kept(
        [[0, 1], [2, 5]], 8, phase="oneshot", extra={"method": "naee", "calibration": "builtin"}
    )
    recipe = Recipe(
        eep_version="0.1.0", base_model="mistralai/Mixtral-8x7B-v0.1",
        candidate=CANDIDATE_FILE, candidate_hash=cand.content_hash(),
    )
    facts = ExportFacts(family="mixtral", num_experts=8, keep=2, top_k=2, stock=True, parameters=10**9)
    card = render_card(recipe, cand, facts)
    assert front_matter(card)["base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert "NAEE (one-shot expert pruning, Lu et al. 2024) (pure pruning; calibration: builtin)" in card
    assert "| 0 | 0, 1 |" in card and "| 1 | 2, 5 |" in card
    assert "import eep" not in card  # a stock checkpoint loads with plain transformers


def test_recipe_refuses_a_changed_candidate_and_its_own_folder(base, tmp_path, capsys):
    export_model(base, Candidate.from_kept([[1, 2, 4, 7]] * 3, 8), tmp_path / "a")
    recipe = tmp_path / "a" / RECIPE_FILE
    assert main(["export", "--recipe", str(recipe), "--out", str(tmp_path / "a")]) == 2
    assert "recipe's own folder" in capsys.readouterr().err
    Candidate.from_kept([[0, 2, 4, 7]] * 3, 8).save(tmp_path / "a" / CANDIDATE_FILE)
    assert main(["export", "--recipe", str(recipe), "--out", str(tmp_path / "b")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["export", "--recipe", str(recipe), "--model", base, "--out", "x"]) == 2
    assert "drop --model/--candidate" in capsys.readouterr().err


@pytest.fixture(scope="module")
def campaign_run(base, tmp_path_factory):
    """A real EEP campaign on the tiny Mixtral that exports its choice."""
    from conftest import run_tiny_campaign  # noqa: PLC0415

    root = tmp_path_factory.mktemp("campaign")
    strategy = {"kind": "eep", "init_population": 4, "discrete_iter": 6, "total_iter": 10}
    return run_tiny_campaign("card-tiny", base, strategy, {"run_dir": str(root / "run"), "export": True})


@pytest.mark.slow
def test_campaign_export_has_the_test_table_and_rebuilds(campaign_run, tmp_path):
    run_dir = campaign_run.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    card = (run_dir / "model" / "README.md").read_text()
    rows = method_rows(summary)
    assert [r["row"] for r in rows][:2] == ["reference", "baseline"]
    for r in rows:  # every row of the summary, with its label and scores, chosen in bold
        label = f"**{r['label']}**" if r["chosen"] else r["label"]
        cells = [fmt_score(r.get(k)) for k in ("test", "dev", "search")]
        assert f"| {label} | {' | '.join(cells)} | {r.get('evaluations', 0)} |" in card
    assert "| Task | `compare` (multiple_choice); splits search 8 / dev 8 / test 8 |" in card
    chosen = next(r for r in rows if r["chosen"])
    assert f"{chosen['label']} (" in card and "campaign strategy `eep`" in card
    recipe = Recipe.from_yaml(run_dir / "model" / RECIPE_FILE)
    assert recipe.campaign == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recipe.candidate_hash == Candidate.load(run_dir / "best.safetensors").content_hash()
    assert main(["export", "--recipe", str(run_dir / "model" / RECIPE_FILE),
                 "--out", str(tmp_path / "again")]) == 0
    assert files_of(run_dir / "model") == files_of(tmp_path / "again")


@pytest.mark.parametrize(
    ("search", "dev", "note"),
    [
        ("exact_match", None, "Test split, `exact_match`. "),
        ("char_similarity", None, "Test split, `exact_match`; dev and search in `char_similarity`."),
        ("loglik", "exact_match", "Test split, `exact_match`; dev in `exact_match`; search in `loglik`."),
    ],
)
def test_card_names_the_dev_and_search_metrics(search, dev, note):
    from eep.recipe import ResultRow, Results

    cand = Candidate.from_kept([[0, 1], [2, 5]], 8)
    results = Results(
        task="add", scorer="generate", metric="exact_match", search_metric=search, dev_metric=dev,
        splits={"search": 64, "dev": 64, "test": 200},
        rows=[ResultRow(label="EEP", row="eep", test=0.9, dev=0.9, search=-0.1, evaluations=401, chosen=True)],
    )
    recipe = Recipe(eep_version="0.1.0", base_model="builtin:deep-moe", candidate=CANDIDATE_FILE,
                    candidate_hash=cand.content_hash(), results=results)
    facts = ExportFacts(family="mixtral", num_experts=8, keep=2, top_k=2, stock=True, parameters=10**6)
    assert note in render_card(recipe, cand, facts)
