"""Model classes for checkpoints whose router mapping has no stock equivalent.

A candidate in `probs` mode with non-one-hot router rows routes by R @ softmax(G x): no stock
gate computes that. Its exported checkpoint has `model_type: eep_<family>` and each MoE layer's
gate holds the original `weight [E, d]` plus `router_map [k, E]`. Importing `eep` registers these
classes with transformers' Auto classes, so after `import eep`
`AutoModelForCausalLM.from_pretrained(dir)` loads such a checkpoint without `trust_remote_code`.

The same classes carry NAEE dynamic skipping: a config with `eep_skip_thresholds` (one threshold
per MoE layer) gets `eep.models.skipping.DynamicSkipping` installed; with `num_router_experts`
unset the routers stay the stock ones (a pruned checkpoint whose only addition is skipping).
The mapped routers route by the family's `Routing` read from the same config (scaling factor,
group-limited top-k on slots), exactly as the in-place surgery does.

They also carry per-layer budgets: a config with `eep_layer_experts` (one expert count k_l per MoE
layer, in `moe_layers` order; the family's expert-count field holds max k_l) gets every MoE layer
resized to its k_l experts before the weights load, with per-layer top-k min(top_k, k_l), as
`Surgery.apply` leaves the in-place model. The three additions combine in any subset.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from eep.models.families import FAMILIES, MoELayer, detect_family, moe_layers
from eep.models.routing import ProbabilityMappedRouter
from eep.models.skipping import CONFIG_FIELD as SKIP_CONFIG_FIELD
from eep.models.skipping import DynamicSkipping

MAPPED_PREFIX = "eep_"
LAYER_EXPERTS_FIELD = "eep_layer_experts"  # config.json: expert count of every MoE layer


def _mapped_model_init(base_init):
    def __init__(self, config):
        base_init(self, config)
        family = detect_family(config)
        layers = moe_layers(self)
        thresholds = getattr(config, SKIP_CONFIG_FIELD, None)
        if thresholds:
            # Installed before the per-layer top-k clip: its top-2 check reads the model's top-k,
            # and a layer left with one expert just runs it (the hook passes top-1 through).
            DynamicSkipping(self, thresholds)
        counts = getattr(config, LAYER_EXPERTS_FIELD, None)
        if counts:
            if len(counts) != len(layers):
                raise ValueError(
                    f"{LAYER_EXPERTS_FIELD} has {len(counts)} expert counts for a model with "
                    f"{len(layers)} MoE layers"
                )
            top_k = int(config.num_experts_per_tok)
            for layer, keep in zip(layers, counts, strict=True):
                _resize_layer(layer, int(keep), top_k)
        if getattr(config, "num_router_experts", None):  # unset: stock routers (skipping only)
            routing = family.routing(config)
            for layer in layers:
                gate = layer.gate
                layer.block.gate = ProbabilityMappedRouter(
                    hidden_dim=gate.weight.shape[1],
                    num_router_experts=config.num_router_experts,
                    keep=layer.experts.num_experts,
                    top_k=gate.top_k,
                    routing=routing,
                    dtype=gate.weight.dtype,
                    device=gate.weight.device,
                )

    return __init__


def _resize_layer(layer: MoELayer, keep: int, top_k: int) -> None:
    """Give one MoE layer `keep` experts and stock-gate rows, as `Surgery.apply` leaves it."""

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        # Empty: from_pretrained fills them (from_config initialises them like any new weight).
        return torch.empty((keep, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)

    experts, gate = layer.experts, layer.gate
    experts.gate_up_proj = nn.Parameter(rows(experts.gate_up_proj), experts.gate_up_proj.requires_grad)
    experts.down_proj = nn.Parameter(rows(experts.down_proj), experts.down_proj.requires_grad)
    experts.num_experts = keep
    gate.weight = nn.Parameter(rows(gate.weight), gate.weight.requires_grad)
    bias = getattr(gate, "e_score_correction_bias", None)  # DeepSeek-V3: a registered buffer
    if bias is not None:
        gate.e_score_correction_bias = rows(bias)
    gate.num_experts = keep
    # A layer keeping fewer experts than top_k routes every token to all of them.
    layer_top_k = min(top_k, keep)
    gate.top_k = layer_top_k
    if hasattr(layer.block, "top_k"):
        layer.block.top_k = layer_top_k


def _register(model_type: str) -> tuple[type, type] | None:
    base_config_cls = CONFIG_MAPPING[model_type]
    base_model_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if base_model_name is None:
        return None
    import transformers

    base_model_cls = getattr(transformers, base_model_name)
    mapped_type = MAPPED_PREFIX + model_type
    config_cls = type(
        f"EEP{base_config_cls.__name__}",
        (base_config_cls,),
        {"model_type": mapped_type, "__doc__": f"{base_config_cls.__name__} + EEP router map."},
    )
    model_cls = type(
        f"EEP{base_model_cls.__name__}",
        (base_model_cls,),
        {
            "config_class": config_cls,
            "__init__": _mapped_model_init(base_model_cls.__init__),
            # transformers decides whether a class may pick its experts kernel (grouped_mm by
            # default) by reading the source of the class's module, caching the answer on the
            # class; ours lives here, so it inherited the base's answer only once the base had
            # been asked: the kernel depended on what loaded first. Ask the base every time.
            "_can_set_experts_implementation": classmethod(
                lambda cls, base=base_model_cls: base._can_set_experts_implementation()
            ),
            "__doc__": f"{base_model_cls.__name__} whose MoE gates apply an EEP router map.",
        },
    )
    AutoConfig.register(mapped_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


# Every family: a sigmoid-routed one (DeepSeek-V3) has no probability mapping (the router refuses
# it), but its checkpoints can still carry dynamic skipping.
MAPPED_CLASSES: dict[str, tuple[type, type]] = {}
for _family in FAMILIES:
    for _model_type in _family.model_types:
        _classes = _register(_model_type)
        if _classes is not None:
            MAPPED_CLASSES[_model_type] = _classes


def mapped_config_class(model_type: str) -> type:
    """The registered `eep_<model_type>` config class."""
    if model_type not in MAPPED_CLASSES:
        raise ValueError(
            f"no router-mapped model class for {model_type!r}; available for: "
            f"{', '.join(sorted(MAPPED_CLASSES))}"
        )
    return MAPPED_CLASSES[model_type][0]
