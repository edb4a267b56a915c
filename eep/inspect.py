"""What an MoE model is made of and what pruning it buys, from its config alone.

`describe_model(config)` instantiates the model on the `meta` device (shapes, no memory, no
weights), counts parameters per expert, in experts and elsewhere, and derives the bf16 size of
the model when every MoE layer keeps E, E/2 or E/4 routed experts, and the GPU memory one
Evaluator replica needs: the cached original experts + the working model at keep + an activation
allowance (see `eep.models.surgery`: originals stay aside, the working tensors hold keep experts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from eep.models.families import detect_family, get_num_experts, moe_layers

BYTES_PER_PARAM = 2  # bf16, how the Evaluator holds real models
GIB = 1024**3
DEFAULT_ACTIVATION_GIB = 6.0
# Usable memory of one GPU as the driver leaves it to a process (seen on this workplace's
# H100 80 GB and H200 141 GB), not the marketing figure.
GPU_USABLE_BYTES: dict[str, int] = {"80 GB": 78 * GIB, "141 GB": 139 * GIB}


@dataclass
class SizeAtKeep:
    """Parameters and bf16 bytes of the model when every MoE layer keeps `keep` routed experts."""

    keep: int
    label: str  # "E", "E/2", "E/4"
    params: int
    bytes: int


@dataclass
class EvaluatorMemory:
    """GPU memory of one Evaluator replica at `keep`: originals + working model + activations."""

    keep: int
    label: str
    originals_bytes: int  # every routed expert, as loaded (bf16)
    working_bytes: int  # non-expert parameters + keep experts per layer (bf16)
    activation_bytes: int
    total_bytes: int
    gpus: dict[str, int]  # GPU size -> how many one replica needs (at least)


@dataclass
class ModelReport:
    """Structure, parameter counts and memory figures of one MoE model."""

    model: str
    family: str
    model_type: str
    num_layers: int
    moe_layers: list[int]  # decoder indices of the MoE layers
    num_experts: int
    top_k: int
    shared_experts: int  # per MoE layer, not routed (they never shrink)
    shared_expert_params: int  # all layers
    gate_up_params_per_expert: int
    down_params_per_expert: int
    expert_params: int  # routed experts, all layers
    non_expert_params: int
    total_params: int
    sizes: list[SizeAtKeep] = field(default_factory=list)
    evaluator: list[EvaluatorMemory] = field(default_factory=list)
    activation_bytes: int = 0
    builtin: dict | None = None  # a built-in model's purpose and training record

    @property
    def params_per_expert(self) -> int:
        """Parameters of one routed expert (gate_up + down)."""
        return self.gate_up_params_per_expert + self.down_params_per_expert

    def to_dict(self) -> dict:
        """A JSON-ready dict of every figure."""
        data = asdict(self)
        data["params_per_expert"] = self.params_per_expert
        data["bytes_per_param"] = BYTES_PER_PARAM
        data["gpu_usable_bytes"] = dict(GPU_USABLE_BYTES)
        return data

    def format(self) -> str:
        """A human-readable report."""
        moe = len(self.moe_layers)
        dense = self.num_layers - moe
        shared = (
            f"{self.shared_experts} per layer ({_b(self.shared_expert_params)} params in all)"
            if self.shared_experts
            else "none"
        )
        # An export with per-layer budgets holds fewer experts than E in some layers.
        held = self.expert_params // self.params_per_expert if self.params_per_expert else 0
        uneven = held != moe * self.num_experts
        layout = f"{held} experts over {moe} layers" if uneven else f"{moe} layers x {self.num_experts} experts"
        lines = [
            f"{self.model} ({self.family}, model_type {self.model_type})",
            f"  decoder layers      {self.num_layers} ({moe} MoE" + (f", {dense} dense)" if dense else ")"),
            f"  routed experts      E = {'up to ' if uneven else ''}{self.num_experts} per MoE layer, "
            f"top-k = {self.top_k}",
            f"  shared experts      {shared}",
            f"  params per expert   {self.params_per_expert:,} (gate_up {self.gate_up_params_per_expert:,}"
            f" + down {self.down_params_per_expert:,})",
            f"  expert params       {_b(self.expert_params)} ({100 * self.expert_params / self.total_params:.1f}%;"
            f" {layout})",
            f"  non-expert params   {_b(self.non_expert_params)}",
            f"  total params        {_b(self.total_params)} ({self.total_params:,})",
            "model size in bf16 (only the routed experts shrink):",
        ]
        for s in self.sizes:
            lines.append(
                f"  keep {s.keep:>3} ({s.label:<3})  {_b(s.params):>9} params  "
                f"{s.bytes / 1e9:7.1f} GB  ({s.bytes / GIB:.1f} GiB)"
            )
        lines.append(
            "evaluator GPU memory per replica (bf16): cached originals + working model at keep "
            f"+ {self.activation_bytes / GIB:.1f} GiB activation allowance:"
        )
        for m in self.evaluator:
            gpus = ", ".join(f"{n} x {size}" for size, n in m.gpus.items())
            lines.append(
                f"  keep {m.keep:>3} ({m.label:<3})  {m.originals_bytes / GIB:.1f} + "
                f"{m.working_bytes / GIB:.1f} + {m.activation_bytes / GIB:.1f} = "
                f"{m.total_bytes / GIB:.1f} GiB  -> at least {gpus} GPUs"
            )
        usable = ", ".join(f"{size}: {b / GIB:.0f} GiB" for size, b in GPU_USABLE_BYTES.items())
        lines.append(f"  (usable memory per GPU taken as {usable})")
        if self.builtin:
            lines += _format_builtin(self.builtin)
        return "\n".join(lines)


def builtin_info(spec: str) -> dict | None:
    """Purpose and training record of a `builtin:NAME` model (None for any other MODEL)."""
    from eep.builtin import MODELS  # noqa: PLC0415  (only built-in specs need it)

    model = MODELS.get(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else None
    if model is None:
        return None
    return {"name": model.name, "purpose": model.purpose, "training": model.training_record()}


def _format_builtin(info: dict) -> list[str]:
    record = info["training"]
    lines = [f"built-in model builtin:{info['name']}: {info['purpose']}"]
    if not record:
        return lines + ["  (no training.json)"]
    shape = record.get("shape", {})
    recipe = ", ".join(f"{k} {v}" for k, v in shape.items()) if shape else "the default shape"
    lines.append(
        f"  trained {record['steps']} steps ({record.get('tied_steps', 0)} tied), seed "
        f"{record['seed']}, {record['threads']} thread(s), {record['train_seconds']:.0f} s; {recipe}"
    )
    accuracy = record.get("test_accuracy", {})
    if accuracy:
        tasks = " ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
        lines.append(
            f"  test accuracy ({record.get('test_examples_per_task', '?')} per task): mean "
            f"{record.get('test_accuracy_mean', sum(accuracy.values()) / len(accuracy)):.3f}; {tasks}"
        )
    return lines


def describe_model(
    config: PretrainedConfig,
    model: str = "",
    activation_gib: float = DEFAULT_ACTIVATION_GIB,
) -> ModelReport:
    """Count parameters of an MoE config (meta device, no weights) and derive sizes and memory."""
    if activation_gib < 0:
        raise ValueError(f"activation allowance must be >= 0 GiB, got {activation_gib}")
    family = detect_family(config)
    num_experts = get_num_experts(config, family)
    with torch.device("meta"):
        instance = AutoModelForCausalLM.from_config(config)
    layers = moe_layers(instance)
    total = sum(p.numel() for p in instance.parameters())  # tied weights counted once
    per_layer = [(layer.experts.gate_up_proj.numel(), layer.experts.down_proj.numel()) for layer in layers]
    # Experts each layer holds: E, or its own count in an export with per-layer budgets.
    held = [int(layer.experts.gate_up_proj.shape[0]) for layer in layers]
    expert_params = sum(gu + d for gu, d in per_layer)
    shared_params = 0
    if family.shared_expert:
        for layer in layers:
            module = getattr(layer.block, family.shared_expert, None)
            if module is not None:
                shared_params += sum(p.numel() for p in module.parameters())
    shared_count = int(getattr(config, "n_shared_experts", None) or (1 if shared_params else 0))
    non_expert = total - expert_params
    gate_up0, down0 = per_layer[0]

    def params_at(keep: int) -> int:
        # Routed experts shrink to keep per layer; everything else (gates included) stays.
        return non_expert + sum((gu + d) // n * keep for (gu, d), n in zip(per_layer, held, strict=True))

    keeps = _keeps(num_experts)
    activation = int(activation_gib * GIB)
    sizes = [
        SizeAtKeep(keep, label, params_at(keep), params_at(keep) * BYTES_PER_PARAM)
        for keep, label in keeps
    ]
    evaluator = []
    for keep, label in keeps[1:]:
        originals = expert_params * BYTES_PER_PARAM
        working = params_at(keep) * BYTES_PER_PARAM
        need = originals + working + activation
        gpus = {size: math.ceil(need / usable) for size, usable in GPU_USABLE_BYTES.items()}
        evaluator.append(EvaluatorMemory(keep, label, originals, working, activation, need, gpus))
    return ModelReport(
        model=model or getattr(config, "_name_or_path", "") or config.model_type,
        family=family.name,
        model_type=config.model_type,
        num_layers=int(config.num_hidden_layers),
        moe_layers=[layer.index for layer in layers],
        num_experts=num_experts,
        top_k=int(config.num_experts_per_tok),
        shared_experts=shared_count,
        shared_expert_params=shared_params,
        gate_up_params_per_expert=gate_up0 // held[0],
        down_params_per_expert=down0 // held[0],
        expert_params=expert_params,
        non_expert_params=non_expert,
        total_params=total,
        sizes=sizes,
        evaluator=evaluator,
        activation_bytes=activation,
        builtin=builtin_info(model),
    )


def _keeps(num_experts: int) -> list[tuple[int, str]]:
    keeps: list[tuple[int, str]] = []
    for divisor, label in ((1, "E"), (2, "E/2"), (4, "E/4")):
        keep = num_experts // divisor
        if keep >= 1 and keep not in [k for k, _ in keeps]:
            keeps.append((keep, label))
    return keeps


def _b(n: int) -> str:
    """A parameter count in billions (or millions for small models)."""
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
