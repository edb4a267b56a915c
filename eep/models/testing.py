"""Tiny random MoE models of every supported family, for tests and CPU benchmarks."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

TINY_FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
)

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    # A wide init so routing is far from uniform and top-k choices differ between tokens.
    initializer_range=0.2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# DeepSeek's grouped routing needs more experts: V2 groups 16 experts into 4 groups (2 kept at
# keep 8), V3 scores each group by its top-2 experts, so 8 groups need 32 experts to prune to 16.
TINY_EXPERTS: dict[str, int] = {"deepseek_v2": 16, "deepseek_v3": 32}


def tiny_num_experts(family: str) -> int:
    """The default number of routed experts of `family`'s tiny config."""
    return TINY_EXPERTS.get(family, 8)


def tiny_keep(family: str) -> int:
    """Half the tiny config's experts: a keep that fits every family's grouped routing."""
    return tiny_num_experts(family) // 2


def tiny_config(
    family: str, num_experts: int | None = None, num_layers: int = 3, **overrides
) -> PretrainedConfig:
    """A small config of `family` with `num_experts` routed experts per MoE layer.

    Routing values are the real checkpoints' where they matter: DeepSeek-V2 routed_scaling_factor
    16 with group-limited top-3 from 2 of 4 groups (DeepSeek-V2: factor 16, top-6 from 3 of 8
    groups), DeepSeek-V3 2.5 with n_group 8, topk_group 4 and a non-zero score-correction bias
    (set by `tiny_model`).
    """
    num_experts = num_experts or tiny_num_experts(family)
    common = dict(_COMMON, num_hidden_layers=num_layers)
    if family == "mixtral":
        cfg = MixtralConfig(**common, num_local_experts=num_experts)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **common, num_experts=num_experts, moe_intermediate_size=48,
            shared_expert_intermediate_size=64, norm_topk_prob=False,
        )
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, num_experts=num_experts, moe_intermediate_size=48, norm_topk_prob=True, head_dim=16)
    elif family == "olmoe":
        cfg = OlmoeConfig(**common, num_experts=num_experts, norm_topk_prob=False)
    elif family == "deepseek_v2":
        # MLA attention: real DeepSeek configs have as many key/value heads as query heads, and
        # transformers' DeepSeek attention needs that on padded batches.
        cfg = DeepseekV2Config(
            **{**common, "num_key_value_heads": common["num_attention_heads"]}, n_routed_experts=num_experts, moe_intermediate_size=48, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy", n_group=4,
            topk_group=2, routed_scaling_factor=16.0,
        )
        # Top-3 from 2 of 4 groups: with top-k <= topk_group the groups could never matter.
        cfg.num_experts_per_tok = 3
    elif family == "deepseek_v3":
        cfg = DeepseekV3Config(
            **{**common, "num_key_value_heads": common["num_attention_heads"]}, n_routed_experts=num_experts, moe_intermediate_size=48, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, n_group=8, topk_group=4, norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )
    else:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_FAMILIES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny random model of `family` in float32, eval mode, eager experts, seeded."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **config_overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    _spread_router_biases(model)
    return model.eval()


def _spread_router_biases(model: torch.nn.Module) -> None:
    # DeepSeek-V3's score-correction bias is zero at init; give it values so slicing it is tested.
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.linspace(-0.05, 0.05, buf.numel()))


def save_tiny_model(path, family: str = "mixtral", seed: int = 0, **config_overrides) -> str:
    """Save `tiny_model(family)` with the built-in character tokenizer as a model folder at `path`."""
    from eep.builtin.tokenizer import build_tokenizer  # noqa: PLC0415  (tests only need it here)

    tokenizer = build_tokenizer()
    config_overrides.setdefault("vocab_size", len(tokenizer))
    tiny_model(family, seed=seed, **config_overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
