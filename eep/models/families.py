"""Model families: where a family keeps its MoE blocks and how its router behaves.

Architecture support is data, not branches: every supported family in transformers 5 stores a
layer's experts as one `...Experts` module with fused `gate_up_proj [E, 2I, d]` and
`down_proj [E, d, I]`, and its router as `mlp.gate` with `weight [E, d]`, `top_k` and
`num_experts`. A family adds only how its router scores experts (`Routing`, one description per family and
config) and which config field holds E. Everything outside `eep/models/` asks these objects,
never a family's module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import PretrainedConfig


class UnsupportedModelError(ValueError):
    """The model is not an MoE model of a family eep supports."""


TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


@dataclass(frozen=True)
class Routing:
    """How one model's routers turn logits into top-k weights (read from family + config).

    The routing math itself is `eep.models.routing.route`; this is only its description. The
    values follow transformers' router classes (5.x): see each family in `FAMILIES`.
    """

    scoring: Literal["softmax", "sigmoid"]
    renormalize: bool  # top-k weights divided by their sum
    scaling_factor: float = 1.0  # DeepSeek routed_scaling_factor, applied after renormalising
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias, for the choice only
    renorm_epsilon: float = 0.0  # DeepSeek-V3 adds 1e-20 to the renormalising sum
    float32_logits: bool = False  # DeepSeek: logits from float32 hidden states and gate
    cast_weights: bool = False  # Qwen/OLMoE: weights cast to the logits' dtype (Mixtral: float32)

    @property
    def grouped(self) -> bool:
        """Whether top-k is limited to the best `topk_group` of `n_group` expert groups."""
        return self.topk_method != "greedy"

    def keep_refusal(self, keep: int) -> str | None:
        """Why `keep` experts cannot be routed by this routing (None: they can)."""
        if not self.grouped:
            return None
        # Groups are consecutive runs of keep / n_group experts, as in the stock router.
        if keep % self.n_group:
            return f"keep must be a multiple of n_group={self.n_group}, got keep={keep}"
        if self.topk_method == "noaux_tc" and keep // self.n_group < 2:
            return (
                f"keep must give at least 2 experts to each of n_group={self.n_group} groups "
                f"(groups are scored by their top-2 experts), got keep={keep}"
            )
        return None

    def mapping_refusal(self) -> str | None:
        """Why the probability router mapping is not defined for this routing (None: it is)."""
        if self.scoring != "softmax":
            return (
                f"experts are scored with a {self.scoring}: the probability router mapping is "
                "defined on softmax probabilities only"
            )
        return None


@dataclass(frozen=True)
class MoEFamily:
    """What eep needs to know about one model family."""

    name: str
    model_types: tuple[str, ...]
    experts_field: str  # config field holding E (aliases are set too, see set_num_experts)
    scoring: Literal["softmax", "sigmoid"]
    # "always": top-k weights are divided by their sum; "norm_topk_prob": only when that flag is
    # set in the config; "never": not at all (transformers' DeepSeek-V2 router ignores the flag).
    renormalize: Literal["always", "norm_topk_prob", "never"]
    # Qwen/OLMoE cast the routing weights to the logits' dtype; Mixtral and DeepSeek hand float32
    # weights to the experts.
    cast_weights: bool
    # "config": read `topk_method` from the config (DeepSeek-V2); otherwise fixed.
    topk_method: Literal["greedy", "config", "noaux_tc"] = "greedy"
    deepseek_gate: bool = False  # float32 logits, routed_scaling_factor, groups from the config
    shared_expert: str | None = None  # not routed: surgery leaves it untouched

    def renormalizes(self, config: PretrainedConfig) -> bool:
        """Whether the router divides the top-k weights by their sum for this config."""
        if self.renormalize == "never":
            return False
        return self.renormalize == "always" or bool(getattr(config, "norm_topk_prob", False))

    def routing(self, config: PretrainedConfig) -> Routing:
        """This family's routing for `config` (an error names an unsupported config value)."""
        method = self.topk_method
        if method == "config":
            method = getattr(config, "topk_method", None) or "greedy"
            if method not in ("greedy", "group_limited_greedy"):
                raise UnsupportedModelError(
                    f"{self.name}: config topk_method={method!r} is not supported; "
                    "supported: 'greedy', 'group_limited_greedy'"
                )
        n_group, topk_group = 1, 1
        if method != "greedy":
            n_group = getattr(config, "n_group", None)
            topk_group = getattr(config, "topk_group", None)
            if not n_group or not topk_group or not 1 <= topk_group <= n_group:
                raise UnsupportedModelError(
                    f"{self.name}: topk_method={method!r} needs n_group >= topk_group >= 1 in "
                    f"the config, got n_group={n_group!r}, topk_group={topk_group!r}"
                )
        scale = getattr(config, "routed_scaling_factor", None) if self.deepseek_gate else None
        return Routing(
            scoring=self.scoring,
            renormalize=self.renormalizes(config),
            scaling_factor=float(scale) if scale is not None else 1.0,
            topk_method=method,  # type: ignore[arg-type]
            n_group=int(n_group),
            topk_group=int(topk_group),
            correction_bias=method == "noaux_tc",
            renorm_epsilon=1e-20 if method == "noaux_tc" else 0.0,
            float32_logits=self.deepseek_gate,
            cast_weights=self.cast_weights,
        )


FAMILIES: tuple[MoEFamily, ...] = (
    # transformers' routers, per family (5.x):
    # Mixtral: softmax(float32) over logits in the model dtype, top-k, renormalise; float32 weights.
    MoEFamily("mixtral", ("mixtral",), "num_local_experts", "softmax", "always", False),
    # Qwen2-MoE, Qwen3-MoE, OLMoE: as Mixtral, renormalise only with norm_topk_prob, then cast
    # the weights to the logits' dtype.
    MoEFamily(
        "qwen2_moe", ("qwen2_moe",), "num_experts", "softmax", "norm_topk_prob", True,
        shared_expert="shared_expert",
    ),
    MoEFamily("qwen3_moe", ("qwen3_moe",), "num_experts", "softmax", "norm_topk_prob", True),
    MoEFamily("olmoe", ("olmoe",), "num_experts", "softmax", "norm_topk_prob", True),
    # DeepSeek-V2: float32 logits, softmax, greedy or group-limited top-k (groups scored by their
    # best expert, the others' scores set to 0), no renormalisation, times routed_scaling_factor.
    MoEFamily(
        "deepseek_v2", ("deepseek_v2",), "n_routed_experts", "softmax", "never", False,
        topk_method="config", deepseek_gate=True, shared_expert="shared_experts",
    ),
    # DeepSeek-V3: float32 logits, sigmoid, choice on sigmoid + e_score_correction_bias within
    # the best topk_group groups (scored by their top-2 sum), weights = the sigmoids without the
    # bias, renormalised with norm_topk_prob (+1e-20), times routed_scaling_factor.
    MoEFamily(
        "deepseek_v3", ("deepseek_v3",), "n_routed_experts", "sigmoid", "norm_topk_prob", False,
        topk_method="noaux_tc", deepseek_gate=True, shared_expert="shared_experts",
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
