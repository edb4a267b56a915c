"""Resolve a MODEL argument (builtin name, local path or hub id) and load it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from eep.builtin import MODELS

log = logging.getLogger(__name__)

BUILTIN_MODELS = {name: model.path for name, model in MODELS.items()}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_model_path(spec: str) -> str:
    """`builtin:NAME` -> its folder; an existing path -> itself; anything else is a hub id."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {spec!r}; built-in: "
                             + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
        path = BUILTIN_MODELS[name]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec}: weights missing under {path} (train them with "
                                    "`python -m eep.builtin.train_tiny`; each model's recipe is in its docstring)")
        return str(path)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{spec}: no such model folder")
    return spec  # a hub id: transformers resolves and downloads it


def parse_dtype(dtype: str | torch.dtype | None, config: PretrainedConfig | None = None) -> torch.dtype:
    """A torch dtype from a name; "auto"/None -> the checkpoint's dtype (float32 if unset)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = _DTYPES.get(stored)
        return stored if isinstance(stored, torch.dtype) else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or auto")
    return _DTYPES[dtype]


def default_experts_implementation(device: torch.device) -> str:
    """The fastest correct experts implementation for a device.

    `batched_mm` copies every expert's weights per token (measured: ~80x slower on the CPU,
    and what `generate()` silently switches `grouped_mm` to on the GPU), so we never use it:
    `eager` everywhere, which also keeps generation from switching.
    """
    return "eager"


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer (None when the folder has none)."""

    model: torch.nn.Module
    tokenizer: object | None
    path: str
    spec: str


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine; "auto" is CUDA when present, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device; use cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is visible to this torch build; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here")
    return parsed


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def load_config(spec: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a MODEL argument, without loading weights; errors name the model."""
    path = resolve_model_path(spec)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        # transformers' messages span lines and suggest hub look-ups for local folders.
        raise ValueError(f"{spec}: cannot read the model config ({_first_line(exc)})") from None


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for evaluation."""
    import eep.models.mapped  # noqa: F401  (registers eep's router-mapped model classes)

    path = resolve_model_path(spec)
    device = parse_device(device)
    config = load_config(spec, trust_remote_code=trust_remote_code)
    kwargs: dict = dict(
        dtype=parse_dtype(dtype, config),
        experts_implementation=default_experts_implementation(device),
        trust_remote_code=trust_remote_code,
    )
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:  # no weights, a damaged shard, a hub id that cannot be fetched
        raise ValueError(f"{spec}: cannot load the model weights ({_first_line(exc)})") from None
    if device_map is None:
        model = model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        log.debug("no tokenizer for %s: %s", spec, exc)
        tokenizer = None
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, spec=spec)
