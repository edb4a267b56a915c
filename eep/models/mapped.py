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
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from eep.models.families import FAMILIES, detect_family, moe_layers
from eep.models.routing import ProbabilityMappedRouter
from eep.models.skipping import CONFIG_FIELD as SKIP_CONFIG_FIELD
from eep.models.skipping import DynamicSkipping

MAPPED_PREFIX = "eep_"


def _mapped_model_init(base_init):
    def __init__(self, config):
        base_init(self, config)
        family = detect_family(config)
        if getattr(config, "num_router_experts", None):  # unset: stock routers (skipping only)
            routing = family.routing(config)
            for layer in moe_layers(self):
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
        thresholds = getattr(config, SKIP_CONFIG_FIELD, None)
        if thresholds:
            DynamicSkipping(self, thresholds)

    return __init__


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
