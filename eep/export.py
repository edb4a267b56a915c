"""Write a pruned/merged model as a Hugging Face checkpoint with `keep` experts per layer.

The checkpoint is computed by the same `Surgery` the search evaluates with, so its logits are the
in-place model's. Pure pruning and `logits`-mode candidates give a stock checkpoint that vanilla
`AutoModelForCausalLM.from_pretrained` loads; `probs`-mode candidates with mixed router rows,
NAEE skipping thresholds, or layers keeping different expert counts (a per-layer budget: a stock
config has one expert count) give an `eep_<family>` checkpoint that loads after `import eep`
(see `eep.models.mapped`).

Every export also writes `eep_recipe.yaml` (`eep.recipe`: base model, candidate hash, export
settings, the campaign and its test table when there is one) and a model card `README.md`
(`eep.model_card`) rendered from it; `export_from_recipe` rebuilds the same bytes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from eep import __version__ as EEP_VERSION
from eep.candidate import Candidate, CandidateError
from eep.model_card import CARD_FILE, ExportFacts, format_keep, render_card
from eep.models.families import get_num_experts, moe_layers
from eep.models.loading import load_model
from eep.models.mapped import (
    LAYER_EXPERTS_FIELD,
    MAPPED_PREFIX,
    SKIP_CONFIG_FIELD,
    mapped_config_class,
)
from eep.models.skipping import skip_thresholds_of
from eep.models.surgery import Surgery
from eep.recipe import RECIPE_FILE, ExportSettings, Recipe, RecipeError, results_from_summary

log = logging.getLogger(__name__)
CANDIDATE_FILE = "eep_candidate.safetensors"


@dataclass
class ExportReport:
    """Where the checkpoint went and how to load it."""

    out_dir: Path
    stock: bool
    keep: int | list[int]  # a list (one count per MoE layer) when the layers keep different counts
    num_experts: int
    top_k: int
    parameters: int

    def how_to_load(self) -> str:
        """A Python snippet that loads the exported checkpoint."""
        prefix = "" if self.stock else "import eep  # registers eep's model classes (eep_<family>)\n"
        return (
            f"{prefix}from transformers import AutoModelForCausalLM\n"
            f'model = AutoModelForCausalLM.from_pretrained("{self.out_dir}")'
        )


def export_model(
    model: str,
    candidate: Candidate,
    out_dir: str | Path,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    trust_remote_code: bool = False,
    campaign: Any = None,
    summary: dict | None = None,
) -> ExportReport:
    """Apply `candidate` to `model` (MODEL argument) and save the result to `out_dir`.

    `campaign` (a `CampaignConfig`) and its `summary` go into the recipe and the model card
    (resolved config, task, test table) when the export ends a campaign.
    """
    results = None
    campaign_dict = None
    if campaign is not None:
        campaign_dict = yaml.safe_load(campaign.to_yaml())
        if summary is not None:
            results = results_from_summary(summary, campaign.task)
    recipe = Recipe(
        eep_version=EEP_VERSION,
        base_model=model,
        candidate=CANDIDATE_FILE,
        candidate_hash=candidate.content_hash(),
        export=ExportSettings(
            dtype=dtype, max_shard_size=max_shard_size, trust_remote_code=trust_remote_code
        ),
        campaign=campaign_dict,
        results=results,
    )
    return _export(recipe, candidate, Path(out_dir))


def export_from_recipe(recipe_file: str | Path, out_dir: str | Path) -> ExportReport:
    """Rebuild an export from its `eep_recipe.yaml` and the candidate file beside it."""
    recipe_file, out_dir = Path(recipe_file), Path(out_dir)
    recipe = Recipe.from_yaml(recipe_file)
    if recipe.eep_version != EEP_VERSION:
        log.warning(
            "%s was written by eep %s, this is eep %s: the files may differ",
            recipe_file, recipe.eep_version, EEP_VERSION,
        )
    if out_dir.resolve() == recipe_file.parent.resolve():
        raise RecipeError(f"--out {out_dir} is the recipe's own folder: give another folder")
    candidate = Candidate.load(recipe_file.parent / recipe.candidate)
    if candidate.content_hash() != recipe.candidate_hash:
        raise RecipeError(
            f"{recipe_file}: candidate_hash {recipe.candidate_hash} does not match "
            f"{recipe.candidate} (hash {candidate.content_hash()})"
        )
    return _export(recipe, candidate, out_dir)


def _export(recipe: Recipe, candidate: Candidate, out_dir: Path) -> ExportReport:
    settings = recipe.export
    model, dtype = recipe.base_model, settings.dtype
    max_shard_size, trust_remote_code = settings.max_shard_size, settings.trust_remote_code
    keeps = candidate.keep_per_layer
    # A stock config has one expert count: a per-layer budget needs eep's class to size each layer.
    layer_experts = keeps if len(set(keeps)) > 1 else None
    loaded = load_model(model, device="cpu", dtype=dtype, trust_remote_code=trust_remote_code)
    net = loaded.model
    family = net.config.model_type
    surgery = Surgery(net)
    num_experts = get_num_experts(net.config, surgery.family)
    # Merge layer by layer and drop each layer's originals at once: the model is never held twice.
    surgery.apply(candidate, release_originals=True)
    _check_finite(net)
    mapped_router = not candidate.router_has_stock_equivalent()
    # NAEE dynamic-skipping thresholds need eep's class too (it installs the skipping).
    skip_thresholds = skip_thresholds_of(candidate)
    stock = not mapped_router and skip_thresholds is None and layer_experts is None
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(
        out_dir,
        max_shard_size=max_shard_size,
        # Mapped checkpoints keep the fused layout: their class's parameter names are the keys.
        save_original_format=stock,
    )
    if not stock:
        _write_mapped_config(
            net.config, num_experts, out_dir, mapped_router, skip_thresholds, layer_experts
        )
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out_dir)
    candidate.save(out_dir / CANDIDATE_FILE)
    (out_dir / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    report = ExportReport(
        out_dir=out_dir,
        stock=stock,
        keep=keeps if layer_experts is not None else keeps[0],
        num_experts=num_experts,
        top_k=int(net.config.num_experts_per_tok),
        parameters=sum(p.numel() for p in net.parameters()),
    )
    facts = ExportFacts(
        family=family,
        num_experts=num_experts,
        keep=report.keep,
        top_k=report.top_k,
        stock=stock,
        parameters=report.parameters,
    )
    (out_dir / CARD_FILE).write_text(render_card(recipe, candidate, facts), encoding="utf-8")
    log.info("exported %s experts per layer to %s", format_keep(report.keep, num_experts), out_dir)
    return report


def _check_finite(net: torch.nn.Module) -> None:
    """Refuse merged weights that overflowed the dtype (huge coefficients): no checkpoint of infs."""
    for layer in moe_layers(net):
        tensors = [*layer.block.named_parameters(), *layer.block.named_buffers()]
        for name, tensor in tensors:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise CandidateError(
                    f"model.layers.{layer.index}.mlp.{name}: {bad} of {tensor.numel()} values are inf "
                    f"or NaN after merging in {tensor.dtype} (coefficients too large); nothing was written"
                )


def _write_mapped_config(
    config, num_experts: int, out_dir: Path, mapped_router: bool = True,
    skip_thresholds: list[float] | None = None, layer_experts: list[int] | None = None,
) -> None:
    config_cls = mapped_config_class(config.model_type)
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    extra: dict = {"num_router_experts": num_experts, "router_mapping": "probs"} if mapped_router else {}
    if skip_thresholds is not None:
        extra[SKIP_CONFIG_FIELD] = skip_thresholds
    if layer_experts is not None:
        # The expert-count field already holds max k_l (Surgery set it): the class sizes the base
        # model by it, then each layer down to its own count.
        extra[LAYER_EXPERTS_FIELD] = [int(k) for k in layer_experts]
    mapped = config_cls(**values, **extra)
    mapped.architectures = [f"EEP{config.architectures[0] if config.architectures else 'ForCausalLM'}"]
    mapped.save_pretrained(out_dir)
    written = json.loads((out_dir / "config.json").read_text())
    if written.get("model_type") != MAPPED_PREFIX + config.model_type:
        raise RuntimeError(f"{out_dir}/config.json: model_type not written as expected")


@torch.no_grad()
def max_logit_difference(a: torch.nn.Module, b: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Largest absolute difference between two models' logits on `input_ids`."""
    return float((a(input_ids).logits.float() - b(input_ids).logits.float()).abs().max())
