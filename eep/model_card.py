"""The model card (`README.md`) of an exported checkpoint, rendered from its recipe and the export.

Hugging Face model-card metadata goes in the YAML front matter (`base_model` when the base is a
hub id, `tags`, `library_name`); the body says how the checkpoint was made (base model, family,
method, experts kept per layer, router mapping, task and split sizes, a campaign's test table,
eep version) and how to load and rebuild it. Nothing in it depends on where or when it was
written, so a rebuild from the recipe writes the same bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from eep.candidate import Candidate
from eep.recipe import RECIPE_FILE, Recipe
from eep.summary import fmt_score

CARD_FILE = "README.md"
# A hub id (`owner/name`); local folders and `builtin:` models are not valid `base_model` values.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ONESHOT_NAMES = {"naee": "NAEE (one-shot expert pruning, Lu et al. 2024)", "random": "random pruning"}
_PHASE_NAMES = {
    "init": "EEP (initial random pruning)",
    "prune": "EEP (pruning phase)",
    "merge": "EEP (merging phase)",
    "baseline": "random pruning",
}


@dataclass(frozen=True)
class ExportFacts:
    """What the export learned about the model: family, shape, checkpoint kind."""

    family: str
    num_experts: int
    keep: int | list[int]  # a list (one count per MoE layer) when the layers keep different counts
    top_k: int
    stock: bool
    parameters: int


def format_keep(keep: int | list[int], num_experts: int, detail: bool = True) -> str:
    """Kept experts as text: `4 of 8`, or per-layer counts `1-4 of 8 (per layer 1,2,4,2; 9 in all)`."""
    if isinstance(keep, int):
        return f"{keep} of {num_experts}"
    if len(set(keep)) == 1:
        return f"{keep[0]} of {num_experts}"
    text = f"{min(keep)}-{max(keep)} of {num_experts}"
    if detail:
        text += f" (per layer {','.join(map(str, keep))}; {sum(keep)} in all)"
    return text


def is_hub_id(model: str) -> bool:
    """True for an `owner/name` hub id that is not a local folder."""
    return bool(_HUB_ID.match(model)) and not Path(model).exists()


def describe_method(candidate: Candidate, recipe: Recipe) -> str:
    """EEP / NAEE / ... from the campaign's chosen row, else from the candidate's provenance."""
    kind = "pure pruning" if candidate.is_pure_pruning() else "expert merging"
    if recipe.results is not None:
        chosen = next((r.label for r in recipe.results.rows if r.chosen), None)
        strategy = (recipe.campaign or {}).get("strategy", {}).get("kind")
        if chosen:
            via = f", campaign strategy `{strategy}`" if strategy else ""
            return f"{chosen} ({kind}{via})"
    if candidate.phase == "oneshot":
        method = str(candidate.extra.get("method", "one-shot"))
        name = _ONESHOT_NAMES.get(method, f"one-shot `{method}` criterion")
        calibration = candidate.extra.get("calibration")
        return f"{name} ({kind}" + (f"; calibration: {calibration})" if calibration else ")")
    name = _PHASE_NAMES.get(candidate.phase)
    return f"{name} ({kind})" if name else kind


def render_card(recipe: Recipe, candidate: Candidate, facts: ExportFacts) -> str:
    """The README.md of an exported checkpoint."""
    tags = ["eep", "moe", "mixture-of-experts", "pruning", facts.family]
    if not candidate.is_pure_pruning():
        tags.insert(4, "expert-merging")
    meta: dict = {}
    if is_hub_id(recipe.base_model):
        meta["base_model"] = recipe.base_model
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags})
    front = yaml.safe_dump(meta, sort_keys=False)
    base = recipe.base_model
    eep_class = f"`eep_{facts.family}`, needs `import eep`"
    if not candidate.router_has_stock_equivalent():
        router = f"eep's probability-mapped router ({eep_class})"
    elif facts.stock:
        router = "stock gate rows (a stock transformers checkpoint)"
    else:  # pruned gate rows in eep's class: per-layer expert counts or skipping need it
        router = f"stock gate rows ({eep_class})"
    if candidate.extra.get("skip_thresholds") is not None:
        router += "; NAEE dynamic expert skipping"
    rows = [
        ("Base model", f"`{base}`"),
        ("Family", f"`{facts.family}`"),
        ("Method", describe_method(candidate, recipe)),
        ("Experts per MoE layer", f"{format_keep(facts.keep, facts.num_experts)} kept, top-{facts.top_k}"),
        ("Router mapping", f"{router}; candidate mode `{candidate.router_mapping}`"),
        ("Parameters", f"{facts.parameters / 1e6:.1f} M"),
    ]
    if recipe.results is not None:
        res = recipe.results
        sizes = " / ".join(f"{k} {v}" for k, v in res.splits.items())
        rows.append(("Task", f"`{res.task}` ({res.scorer}); splits {sizes}"))
    rows += [
        ("eep version", recipe.eep_version),
        ("Candidate", f"`{recipe.candidate}`, content hash `{recipe.candidate_hash}`"),
    ]
    parts = [
        f"---\n{front}---",
        f"# {_short_name(base)}: {format_keep(facts.keep, facts.num_experts, detail=False)} "
        "experts per layer",
        f"This checkpoint is `{base}` with its Mixture-of-Experts layers reduced by eep "
        "(expert pruning and merging: EEP evolutionary search, NAEE and other one-shot methods).",
        _table(("", ""), rows),
        "## Experts kept per layer",
        _kept_section(candidate),
    ]
    if recipe.results is not None:
        parts += ["## Results", _results_section(recipe)]
    parts += ["## How to load", _how_to_load(facts.stock), "## Rebuild", _rebuild_section(recipe)]
    return "\n\n".join(parts) + "\n"


def _short_name(model: str) -> str:
    return model.rstrip("/").split("/")[-1].removeprefix("builtin:")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(tuple("---" for _ in header)), *map(line, rows)])


def _kept_section(candidate: Candidate) -> str:
    if candidate.is_pure_pruning():
        intro = "Original expert indices each MoE layer keeps (slot order):"
        rows = [(str(i), ", ".join(map(str, kept))) for i, kept in enumerate(candidate.kept_experts())]
        return intro + "\n\n" + _table(("MoE layer", "kept experts"), rows)
    intro = (
        "Each kept slot is a weighted sum of the original experts (`expert_merge`); the table "
        "names each slot's largest-weight original expert. The full matrices are in "
        "`eep_candidate.safetensors`."
    )
    rows = [(str(i), ", ".join(map(str, kept))) for i, kept in enumerate(candidate.kept_experts())]
    return intro + "\n\n" + _table(("MoE layer", "dominant expert per slot"), rows)


def _results_section(recipe: Recipe) -> str:
    res = recipe.results
    assert res is not None
    note = f"Test split, `{res.metric}`"
    dev = res.dev_metric or res.search_metric
    if dev != res.search_metric:
        note += f"; dev in `{dev}`; search in `{res.search_metric}`"
    elif res.search_metric != res.metric:
        note += f"; dev and search in `{res.search_metric}`"
    note += ". The chosen candidate (this checkpoint) is in bold."
    rows = []
    for r in res.rows:
        label = f"**{r.label}**" if r.chosen else r.label
        rows.append((label, fmt_score(r.test), fmt_score(r.dev), fmt_score(r.search), str(r.evaluations)))
    return note + "\n\n" + _table(("method", "test", "dev", "search", "evaluations"), rows)


def _how_to_load(stock: bool) -> str:
    prefix = "" if stock else "import eep  # registers eep's model classes (eep_<family>)\n"
    return (
        "```python\n"
        f"{prefix}from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
        "```"
    )


def _rebuild_section(recipe: Recipe) -> str:
    return (
        f"`{RECIPE_FILE}` holds the base model, the export settings, the candidate's hash"
        + (" and the resolved campaign" if recipe.campaign is not None else "")
        + ". With the base model at hand, this writes the same files again:\n\n"
        f"```bash\neep export --recipe {RECIPE_FILE} --out rebuilt/\n```"
    )
