"""Import the EEP authors' published coefficient files (`searched_coeff/*.pth`) as Candidates.

A file is an ordered dict {key: [k, E] float tensor}, as the authors' `searched_coeff` files are. Keys:
`layers.<spec>` (expert merging M) and `transfer.<spec>` (router mapping R), where `<spec>` is a
layer index `5` or an inclusive range `[a-b]`; `others` / `others_transfer` cover every layer no
other key matches. The authors resolve them by pattern matching whole dot-separated tokens:

    M of layer l, slot i: the first key in dict order whose pattern occurs in the parameter name
        `model.layers.<l>.block_sparse_moe.experts.<i>.w1.weight` (and w2, w3), else `others`;
        the slot takes row i of that tensor.
    R of layer l: the first key containing "transfer" whose pattern occurs in `transfer.<l>`,
        else `others_transfer`.

We reproduce exactly that, apply rows as given (no re-normalisation, no re-alignment of the
slots of M and R) and mark the result `router_mapping="probs"`, the authors' routing. The file is
read with `torch.load(weights_only=True)` only: nothing in it is ever executed.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from eep.candidate import Candidate

DEFAULT_NUM_LAYERS = 32  # Mixtral-8x7B(-Instruct), the model every published file is for
MERGE_FALLBACK = "others"
ROUTER_FALLBACK = "others_transfer"
# Parameter names as the authors' Mixtral state dict spells them; the merging keys are matched
# against these (one per expert weight, all three must resolve to the same key).
_EXPERT_WEIGHT_NAMES = ("w1", "w2", "w3")


@dataclass
class ReferenceFile:
    """A coefficient file as loaded: its ordered tensors and, for archive records, the scores."""

    path: Path
    coefficients: dict[str, torch.Tensor]  # file order, float32 [k, E]
    scores: dict | None = None  # archive records: {"search": {...}, "eval": [...]}
    ignored_keys: tuple[str, ...] = ()  # vestigial "scaling" vectors nothing reads

    @property
    def keep(self) -> int:
        """Rows of every tensor: the number of kept expert slots."""
        return int(next(iter(self.coefficients.values())).shape[0])

    @property
    def num_experts(self) -> int:
        """Columns of every tensor: the original experts E."""
        return int(next(iter(self.coefficients.values())).shape[1])


@dataclass(frozen=True)
class LayerKeys:
    """Which file keys a layer's matrices come from: one merging key per slot, one router key."""

    expert_merge: tuple[str, ...]  # [keep]
    router_map: str

    def merge_key(self) -> str | list[str]:
        """The merging key, or the per-slot keys when slots resolve differently."""
        keys = set(self.expert_merge)
        return self.expert_merge[0] if len(keys) == 1 else list(self.expert_merge)


# --------------------------------------------------------------------------------- key grammar
def pattern_matches(text: str, pattern: str) -> bool:
    """Whether `pattern` occurs in `text` as a contiguous run of whole "."-separated tokens.

    A pattern token `[a-b]` matches any integer a..b inclusive (written without leading zeros,
    as the authors compare strings), `*` any single token, anything else itself.
    """
    tokens = text.split(".")
    parts = pattern.split(".")
    for start in range(len(tokens) - len(parts) + 1):
        if all(_token_matches(tokens[start + j], part) for j, part in enumerate(parts)):
            return True
    return False


def _token_matches(token: str, part: str) -> bool:
    if part == "*":
        return True
    if "[" in part and "]" in part:
        low, high = _parse_range(part)
        return token.isdigit() and str(int(token)) == token and low <= int(token) <= high
    return token == part


def _parse_range(part: str) -> tuple[int, int]:
    bounds = part[1:-1].split("-")
    try:
        low, high = (int(b) for b in bounds)
    except ValueError:
        raise ValueError(f"key token {part!r}: a range must be written [a-b] with integers a and b") from None
    return low, high


def resolve_layer(keys: list[str], layer: int, keep: int) -> LayerKeys:
    """The keys layer `layer` takes its M rows (per slot) and R from, by the authors' rules."""
    merge_keys = []
    for slot in range(keep):
        found = {_first_merge_key(keys, _param_name(layer, slot, w)) for w in _EXPERT_WEIGHT_NAMES}
        if len(found) != 1:
            raise ValueError(
                f"layer {layer} slot {slot}: its expert weights w1/w2/w3 resolve to different "
                f"keys {sorted(map(str, found))}; eep merges all three with one row"
            )
        merge_keys.append(found.pop())
    router_key = next(
        (k for k in keys if "transfer" in k and pattern_matches(f"transfer.{layer}", k)),
        ROUTER_FALLBACK,
    )
    for key, what in ((MERGE_FALLBACK, "merging (layers.*)"), (ROUTER_FALLBACK, "router (transfer.*)")):
        if key not in keys and key in (*merge_keys, router_key):
            raise ValueError(
                f"layer {layer}: no {what} key matches it and there is no {key!r} fallback key"
            )
    return LayerKeys(tuple(merge_keys), router_key)


def _param_name(layer: int, slot: int, weight: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{slot}.{weight}.weight"


def _first_merge_key(keys: list[str], name: str) -> str:
    # The authors try every key in order; router keys and the fallbacks can never match a
    # parameter name (it has no "transfer"/"others" token), so skipping them changes nothing.
    for key in keys:
        if "transfer" not in key and key != MERGE_FALLBACK and pattern_matches(name, key):
            return key
    return MERGE_FALLBACK


# --------------------------------------------------------------------------------- reading
def read_reference(path: str | Path) -> ReferenceFile:
    """Load an authors' coefficient file (or a 2024 archive record) safely and check its shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such coefficient file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch zip checkpoint (a torch.save file is expected)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        raise ValueError(
            f"{path}: refused or unreadable: only tensors in dicts/tuples are loaded "
            f"(torch.load weights_only=True), never arbitrary objects ({_refusal_reason(exc)})"
        ) from None
    scores = None
    if isinstance(obj, (tuple, list)):
        obj, scores = _split_archive_record(path, obj)
    if not isinstance(obj, dict) or not obj:
        raise ValueError(
            f"{path}: expected a non-empty dict {{key: [keep, num_experts] tensor}}, "
            f"got {type(obj).__name__}"
        )
    coefficients: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: key {key!r} is not a string")
        if "scaling" in key:
            # Vestigial in the authors' code: created nowhere, read nowhere.
            ignored.append(key)
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: {key!r} must be a 2-D [keep, num_experts] tensor, got {shape}")
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key!r} has dtype {value.dtype}, expected floating point")
        coefficients[key] = value.detach().to(torch.float32).clone()
    if not coefficients:
        raise ValueError(f"{path}: no coefficient tensors")
    shapes = {k: tuple(v.shape) for k, v in coefficients.items()}
    first_key, first_shape = next(iter(shapes.items()))
    for key, shape in shapes.items():
        if shape != first_shape:
            raise ValueError(
                f"{path}: inconsistent shapes: {first_key!r} is {list(first_shape)} but {key!r} "
                f"is {list(shape)}; every tensor must be [keep, num_experts]"
            )
        _check_key(path, key)
    return ReferenceFile(path, coefficients, scores, tuple(ignored))


def _check_key(path: Path, key: str) -> None:
    for part in key.split("."):
        if "[" in part and "]" in part:
            try:
                _parse_range(part)
            except ValueError as exc:
                raise ValueError(f"{path}: key {key!r}: {exc}") from None


def _split_archive_record(path: Path, record: tuple | list) -> tuple[object, dict]:
    # The authors' search archive saves (coeff_dict, (metric, train_value)[, [(metric, eval)]]).
    if not 2 <= len(record) <= 3 or not isinstance(record[0], dict):
        raise ValueError(
            f"{path}: a tuple must be an archive record (coeff_dict, (metric, value), [...]); "
            f"got a {type(record).__name__} of {len(record)} items"
        )
    scores: dict = {"search": _score(path, record[1])}
    if len(record) == 3:
        extra = record[2]
        items = extra if isinstance(extra, (list, tuple)) and extra and isinstance(extra[0], (list, tuple)) else [extra]
        scores["eval"] = [_score(path, item) for item in items]
    return record[0], scores


def _score(path: Path, item: object) -> dict:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"{path}: archive score {item!r} is not (metric_name, value)")
    value = item[1].item() if isinstance(item[1], torch.Tensor) else item[1]
    return {"metric": item[0], "value": float(value)}


def _refusal_reason(exc: BaseException) -> str:
    """Why torch refused a file, without its advice to retry with weights_only=False (never safe here)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    keep = [
        line for line in lines
        if "weights_only" not in line and "documentation" not in line and "trusted source" not in line
    ]
    return keep[0] if keep else "it holds something other than tensors"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------- conversion
def to_candidate(
    ref: ReferenceFile,
    layer_indices: list[int],
    top_k: int | None = None,
    model_id: str = "",
) -> Candidate:
    """The Candidate the file means for MoE layers at decoder indices `layer_indices`."""
    keys = list(ref.coefficients)
    keep = ref.keep
    try:
        resolved = [resolve_layer(keys, layer, keep) for layer in layer_indices]
    except ValueError as exc:
        raise ValueError(f"{ref.path}: {exc}") from None
    expert_merge, router_map = [], []
    for layer_keys in resolved:
        rows = [ref.coefficients[key][slot] for slot, key in enumerate(layer_keys.expert_merge)]
        expert_merge.append(torch.stack(rows).clone())
        router_map.append(ref.coefficients[layer_keys.router_map].clone())
    used = {k for lk in resolved for k in (*lk.expert_merge, lk.router_map)}
    extra: dict = {
        "source": ref.path.name,
        "layout": _layout(resolved),
        "key_order": _key_order(keys),
        "groups": {
            "expert_merge": [lk.merge_key() for lk in resolved],
            "router_map": [lk.router_map for lk in resolved],
        },
    }
    unused = [k for k in keys if k not in used]
    if unused:
        extra["unused_keys"] = unused
    if ref.ignored_keys:
        extra["ignored_keys"] = list(ref.ignored_keys)
    if ref.scores is not None:
        extra["scores"] = ref.scores
    return Candidate(
        router_map=router_map,
        expert_merge=expert_merge,
        num_experts=ref.num_experts,
        top_k=top_k,
        router_mapping="probs",
        model_id=model_id,
        phase="reference",
        extra=extra,
    )


def _layout(resolved: list[LayerKeys]) -> str:
    groups = {(lk.expert_merge, lk.router_map) for lk in resolved}
    if len(resolved) > 1 and len(groups) == len(resolved):
        return "per-layer"
    return f"{len(groups)}-group"


def _key_order(keys: list[str]) -> str:
    # Fallbacks come last in both published orders; only the explicit keys tell them apart.
    flags = [("transfer" in k) for k in keys if k not in (MERGE_FALLBACK, ROUTER_FALLBACK)]
    if flags == sorted(flags):
        return "M then R"
    return "interleaved"


def model_moe_layout(model: str) -> tuple[list[int], int]:
    """Decoder indices of a model's MoE layers and its E, from the config alone (meta device)."""
    # Imported here: transformers is slow to import and `eep --help` builds every subcommand.
    from transformers import AutoModelForCausalLM

    from eep.models.families import detect_family, get_num_experts, moe_layers
    from eep.models.loading import load_config

    config = load_config(model)
    with torch.device("meta"):
        instance = AutoModelForCausalLM.from_config(config)
    indices = [layer.index for layer in moe_layers(instance)]
    return indices, get_num_experts(config, detect_family(config))


def import_reference(
    path: str | Path,
    num_layers: int | None = None,
    model: str | None = None,
    top_k: int | None = None,
) -> tuple[Candidate, list[str]]:
    """Convert an authors' file into a Candidate; also returns notes for the user."""
    notes: list[str] = []
    ref = read_reference(path)
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"--num-layers must be >= 1, got {num_layers}")
    model_experts = None
    if model is not None:
        indices, model_experts = model_moe_layout(model)
        if num_layers is not None and num_layers != len(indices):
            raise ValueError(
                f"--num-layers {num_layers} disagrees with {model}, which has {len(indices)} MoE layers"
            )
        source = f"config of {model}"
    elif num_layers is not None:
        indices, source = list(range(num_layers)), "--num-layers"
    else:
        indices, source = list(range(DEFAULT_NUM_LAYERS)), "default (Mixtral-8x7B)"
        notes.append(
            f"assumed {DEFAULT_NUM_LAYERS} MoE layers (Mixtral-8x7B, the model of every published "
            "file); pass --num-layers or --model for another model"
        )
    candidate = to_candidate(ref, indices, top_k=top_k, model_id=model or "")
    candidate.extra["num_layers_from"] = source
    if model_experts is not None:
        # Fail now, not at apply time, when the file was made for another expert count.
        candidate.validate(num_layers=len(indices), num_experts=model_experts)
    if ref.scores is not None:
        notes.append(f"archive record; recorded scores: {ref.scores}")
    if "unused_keys" in candidate.extra:
        notes.append(
            f"keys matching none of the {len(indices)} layers (is the file for a deeper model?): "
            + ", ".join(candidate.extra["unused_keys"])
        )
    if ref.ignored_keys:
        notes.append(f"ignored vestigial scaling keys: {', '.join(ref.ignored_keys)}")
    return candidate, notes
