"""Model families: where a family keeps its MoE blocks and how its router behaves.

Architecture support is data, not branches: every supported family in transformers 5 stores a
layer's experts as one `...Experts` module with fused `gate_up_proj [E, 2I, d]` and
`down_proj [E, d, I]`, and its router as `mlp.gate` with `weight [E, d]`, `top_k` and
`num_experts`. A family adds only how its router scores experts and which config field holds E.
Everything outside `eep/models/` asks these objects, never a family's module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import PretrainedConfig


class UnsupportedModelError(ValueError):
    """The model is not an MoE model of a family eep supports."""


@dataclass(frozen=True)
class MoEFamily:
    """What eep needs to know about one model family."""

    name: str
    model_types: tuple[str, ...]
    experts_field: str  # config field holding E (aliases are set too, see set_num_experts)
    scoring: Literal["softmax", "sigmoid"]
    # "always": top-k weights are divided by their sum; "norm_topk_prob": only when that flag is
    # set in the config.
    renormalize: Literal["always", "norm_topk_prob"]
    # Mixtral passes float32 routing weights to the experts; the others cast to the logits dtype.
    cast_weights: bool
    grouped_topk: bool = False  # DeepSeek: experts are split into n_group groups
    shared_expert: str | None = None  # not routed: surgery leaves it untouched

    def renormalizes(self, config: PretrainedConfig) -> bool:
        """Whether the router divides the top-k weights by their sum for this config."""
        return self.renormalize == "always" or bool(getattr(config, "norm_topk_prob", False))


FAMILIES: tuple[MoEFamily, ...] = (
    MoEFamily("mixtral", ("mixtral",), "num_local_experts", "softmax", "always", False),
    MoEFamily(
        "qwen2_moe", ("qwen2_moe",), "num_experts", "softmax", "norm_topk_prob", True,
        shared_expert="shared_expert",
    ),
    MoEFamily("qwen3_moe", ("qwen3_moe",), "num_experts", "softmax", "norm_topk_prob", True),
    MoEFamily("olmoe", ("olmoe",), "num_experts", "softmax", "norm_topk_prob", True),
    MoEFamily(
        "deepseek_v2", ("deepseek_v2",), "n_routed_experts", "softmax", "norm_topk_prob", True,
        grouped_topk=True, shared_expert="shared_experts",
    ),
    MoEFamily(
        "deepseek_v3", ("deepseek_v3",), "n_routed_experts", "sigmoid", "norm_topk_prob", True,
        grouped_topk=True, shared_expert="shared_experts",
    ),
)
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def detect_family(config: PretrainedConfig) -> MoEFamily:
    """The family of a config, from its model_type (eep's own mapped variants included)."""
    model_type = getattr(config, "model_type", "")
    base = model_type.removeprefix("eep_")
    for family in FAMILIES:
        if base in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported MoE family; supported: "
        f"{', '.join(SUPPORTED_FAMILIES)}"
    )


def get_num_experts(config: PretrainedConfig, family: MoEFamily) -> int:
    """E, the number of routed experts per MoE layer."""
    return int(getattr(config, family.experts_field))


def set_num_experts(config: PretrainedConfig, family: MoEFamily, count: int) -> None:
    """Set the expert count in the config under every name the family's config answers to."""
    setattr(config, family.experts_field, count)
    for name in _EXPERT_COUNT_FIELDS:
        if name != family.experts_field and getattr(config, name, None) is not None:
            try:
                setattr(config, name, count)
            except (AttributeError, TypeError):  # a read-only alias
                pass


@dataclass
class MoELayer:
    """One MoE block of a loaded model: its decoder-layer index, block, router and experts."""

    index: int  # position among decoder layers (dense layers are skipped, so not always = slot)
    block: nn.Module
    gate: nn.Module
    experts: nn.Module


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE blocks of a causal LM, in order; an error if there are none."""
    family = detect_family(model.config)
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `model.layers` decoder stack")
    found = []
    for index, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        gate = getattr(block, "gate", None)
        if experts is not None and hasattr(experts, "gate_up_proj") and gate is not None:
            found.append(MoELayer(index, block, gate, experts))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({family.name}) has no MoE layers with fused experts; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return found


@dataclass(frozen=True)
class ModelShape:
    """The numbers a search needs about a model, read without loading its weights."""

    family: str
    num_moe_layers: int
    num_experts: int
    top_k: int


def model_shape(config: PretrainedConfig) -> ModelShape:
    """Family, MoE layers, experts and top-k of a config (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    family = detect_family(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = moe_layers(model)
    return ModelShape(
        family=family.name,
        num_moe_layers=len(layers),
        num_experts=get_num_experts(config, family),
        top_k=int(layers[0].gate.top_k),
    )
