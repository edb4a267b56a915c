"""A candidate: per MoE layer, a router-mapping matrix R and an expert-merging matrix M.

Row i of both matrices describes kept expert (slot) i of the pruned layer; column j is original
expert j. Kept expert i has weights sum_j M[i, j] * W_j; its routing score is built from the
original routing by R (see `eep.models.routing` for the two modes). Pure pruning is the case where
every row of R and M is the same one-hot vector.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

RouterMapping = Literal["probs", "logits"]
ROUTER_MAPPINGS: tuple[str, ...] = ("probs", "logits")
FORMAT_VERSION = 1


class CandidateError(ValueError):
    """A candidate that is malformed or does not fit the model it is applied to."""


@dataclass
class Candidate:
    """Router-mapping and expert-merging matrices for every MoE layer, plus metadata.

    `router_map[l]` and `expert_merge[l]` are float32 tensors of shape [keep_l, num_experts].
    `top_k` overrides the model's number of active experts per token when set; a layer that
    keeps fewer experts than that routes every token to all of them (a per-layer budget).
    `router_mapping` is "probs" (the EEP authors' mapping of post-softmax probabilities) or
    "logits" (the gate becomes R @ G). `id`, `phase` and `parents` describe where the candidate
    came from and do not enter its content hash.
    """

    router_map: list[torch.Tensor]
    expert_merge: list[torch.Tensor]
    num_experts: int
    top_k: int | None = None
    router_mapping: RouterMapping = "probs"
    model_id: str = ""
    phase: str = ""
    parents: tuple[str, ...] = ()
    id: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.router_map = [_as_matrix(t) for t in self.router_map]
        self.expert_merge = [_as_matrix(t) for t in self.expert_merge]
        self.parents = tuple(self.parents)
        self.validate()

    # ----------------------------------------------------------------------------- shape facts
    @property
    def num_layers(self) -> int:
        """Number of MoE layers the candidate describes."""
        return len(self.router_map)

    @property
    def keep_per_layer(self) -> list[int]:
        """Kept experts of every layer (rows of its matrices)."""
        return [int(m.shape[0]) for m in self.expert_merge]

    @property
    def keep(self) -> int:
        """Kept experts per layer; an error if layers differ (a per-layer budget)."""
        keeps = set(self.keep_per_layer)
        if len(keeps) != 1:
            raise CandidateError(f"layers keep different expert counts: {self.keep_per_layer}")
        return keeps.pop()

    def is_pure_pruning(self) -> bool:
        """True when every row of R and M is the same one-hot vector (plain expert selection)."""
        return all(
            _is_one_hot(m) and torch.equal(m, r)
            for m, r in zip(self.expert_merge, self.router_map, strict=True)
        )

    def kept_experts(self) -> list[list[int]]:
        """Dominant original expert of every slot, per layer (exact for pure pruning)."""
        return [m.abs().argmax(dim=1).tolist() for m in self.expert_merge]

    def router_has_stock_equivalent(self) -> bool:
        """True when a stock checkpoint (sliced/mixed gate rows) reproduces this routing exactly."""
        return self.router_mapping == "logits" or all(_is_one_hot(r) for r in self.router_map)

    # ----------------------------------------------------------------------------- validation
    def validate(self, num_layers: int | None = None, num_experts: int | None = None) -> None:
        """Raise CandidateError when shapes, values or counts are inconsistent (or off the model)."""
        if self.router_mapping not in ROUTER_MAPPINGS:
            raise CandidateError(
                f"router_mapping must be one of {ROUTER_MAPPINGS}, got {self.router_mapping!r}"
            )
        if len(self.router_map) != len(self.expert_merge):
            raise CandidateError(
                f"{len(self.router_map)} router_map matrices but {len(self.expert_merge)} "
                "expert_merge matrices: one of each per MoE layer"
            )
        if not self.router_map:
            raise CandidateError("candidate has no layers")
        if self.num_experts < 1:
            raise CandidateError(f"num_experts must be >= 1, got {self.num_experts}")
        for layer, (r, m) in enumerate(zip(self.router_map, self.expert_merge, strict=True)):
            for name, t in (("router_map", r), ("expert_merge", m)):
                if t.shape[1] != self.num_experts:
                    raise CandidateError(
                        f"layers.{layer}.{name} has shape {tuple(t.shape)}: expected "
                        f"[keep, num_experts={self.num_experts}]"
                    )
                if not torch.isfinite(t).all():
                    raise CandidateError(f"layers.{layer}.{name} contains NaN or inf")
            if r.shape != m.shape:
                raise CandidateError(
                    f"layers.{layer}: router_map {tuple(r.shape)} and expert_merge "
                    f"{tuple(m.shape)} must have the same shape"
                )
            keep = r.shape[0]
            if keep < 1 or keep > self.num_experts:
                raise CandidateError(
                    f"layers.{layer}: keep={keep} must be in 1..num_experts={self.num_experts}"
                )
        if self.top_k is not None and self.top_k < 1:
            raise CandidateError(f"top_k must be >= 1, got {self.top_k}")
        if num_experts is not None and num_experts != self.num_experts:
            raise CandidateError(
                f"candidate is for {self.num_experts} experts per layer but the model has "
                f"{num_experts}"
            )
        if num_layers is not None and num_layers != self.num_layers:
            raise CandidateError(
                f"candidate has {self.num_layers} MoE layers but the model has {num_layers}"
            )

    # ----------------------------------------------------------------------------- identity
    def content_hash(self) -> str:
        """Stable hash of what the candidate computes (matrices, top-k, mapping mode)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.num_experts, self.top_k, self.router_mapping]).encode())
        # Dynamic-skipping thresholds change what the candidate computes (eep.models.skipping).
        if self.extra.get("skip_thresholds") is not None:
            h.update(json.dumps(self.extra["skip_thresholds"]).encode())
        for r, m in zip(self.router_map, self.expert_merge, strict=True):
            for t in (r, m):
                # + 0.0 turns -0.0 into 0.0 so equal values hash equally.
                t = (t.detach().to(torch.float32) + 0.0).contiguous()
                h.update(str(tuple(t.shape)).encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()[:20]

    def with_meta(self, **changes: object) -> Candidate:
        """A copy with other metadata (id, phase, parents, ...) sharing the matrices' values."""
        return replace(self, **changes)

    def clone(self) -> Candidate:
        """A deep copy whose matrices can be edited without touching this one."""
        return replace(
            self,
            router_map=[t.clone() for t in self.router_map],
            expert_merge=[t.clone() for t in self.expert_merge],
            extra=dict(self.extra),
        )

    # ----------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write the candidate as safetensors (tensors + JSON metadata, no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for layer, (r, m) in enumerate(zip(self.router_map, self.expert_merge, strict=True)):
            tensors[f"layers.{layer}.router_map"] = r.contiguous()
            tensors[f"layers.{layer}.expert_merge"] = m.contiguous()
        meta = {
            "format": "eep-candidate",
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "keep": self.keep_per_layer,
            "top_k": self.top_k,
            "router_mapping": self.router_mapping,
            "model_id": self.model_id,
            "phase": self.phase,
            "parents": list(self.parents),
            "id": self.id,
            "hash": self.content_hash(),
            "extra": self.extra,
        }
        if path.is_dir():
            raise CandidateError(f"{path}: is a folder; give a .safetensors file name")
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"eep": json.dumps(meta)})
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)  # only left when writing failed
        return path

    @classmethod
    def load(cls, path: str | Path) -> Candidate:
        """Read a candidate written by `save`; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise CandidateError(f"{path}: candidate file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("eep")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types
            raise CandidateError(f"{path}: not a safetensors candidate file ({exc})") from exc
        if raw_meta is None:
            raise CandidateError(
                f"{path}: no 'eep' metadata; is this an EEP reference .pth? "
                "Convert it with `eep import-reference`"
            )
        meta = _read_meta(path, raw_meta)
        n = meta.num_layers
        try:
            router_map = [tensors[f"layers.{i}.router_map"] for i in range(n)]
            expert_merge = [tensors[f"layers.{i}.expert_merge"] for i in range(n)]
        except KeyError as exc:
            raise CandidateError(f"{path}: missing tensor {exc.args[0]}") from exc
        try:
            return cls(
                router_map=router_map,
                expert_merge=expert_merge,
                num_experts=meta.num_experts,
                top_k=meta.top_k,
                router_mapping=meta.router_mapping,  # type: ignore[arg-type]
                model_id=meta.model_id,
                phase=meta.phase,
                parents=tuple(meta.parents),
                id=meta.id,
                extra=meta.extra,
            )
        except CandidateError as exc:
            raise CandidateError(f"{path}: {exc}") from exc

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def identity(
        cls, num_layers: int, num_experts: int, top_k: int | None = None, **meta: object
    ) -> Candidate:
        """The unchanged model: keep = num_experts, R = M = identity."""
        return cls.from_kept([list(range(num_experts))] * num_layers, num_experts, top_k, **meta)

    @classmethod
    def from_kept(
        cls,
        kept: Sequence[Sequence[int]],
        num_experts: int,
        top_k: int | None = None,
        **meta: object,
    ) -> Candidate:
        """Pure pruning: layer l keeps original experts `kept[l]` (in that slot order)."""
        mats = []
        for layer, experts in enumerate(kept):
            experts = list(experts)
            if len(set(experts)) != len(experts):
                raise CandidateError(f"layers.{layer}: kept experts repeat: {experts}")
            bad = [e for e in experts if not 0 <= e < num_experts]
            if bad:
                raise CandidateError(
                    f"layers.{layer}: expert indices {bad} outside 0..{num_experts - 1}"
                )
            mats.append(torch.eye(num_experts, dtype=torch.float32)[experts])
        return cls(
            router_map=[m.clone() for m in mats],
            expert_merge=mats,
            num_experts=num_experts,
            top_k=top_k,
            **meta,  # type: ignore[arg-type]
        )

    @classmethod
    def random_pruning(
        cls,
        num_layers: int,
        num_experts: int,
        keep: int,
        generator: torch.Generator | int = 0,
        top_k: int | None = None,
        **meta: object,
    ) -> Candidate:
        """Each layer keeps `keep` experts drawn uniformly without replacement, sorted."""
        if not 1 <= keep <= num_experts:
            raise CandidateError(f"keep={keep} must be in 1..num_experts={num_experts}")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        kept = [
            sorted(torch.randperm(num_experts, generator=generator)[:keep].tolist())
            for _ in range(num_layers)
        ]
        return cls.from_kept(kept, num_experts, top_k, **meta)

    def describe(self) -> str:
        """One line for logs: kept experts when pure pruning, else keep and mapping."""
        kind = "prune" if self.is_pure_pruning() else "merge"
        keeps = self.keep_per_layer
        keep = keeps[0] if len(set(keeps)) == 1 else keeps
        return f"{kind} keep={keep} top_k={self.top_k} mapping={self.router_mapping} hash={self.content_hash()}"


class _Metadata(BaseModel):
    """The JSON under a candidate file's `eep` key (what `save` writes; unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    num_layers: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int | None = Field(default=None, ge=1)
    router_mapping: str = "probs"
    model_id: str = ""
    phase: str = ""
    parents: list[str] = Field(default_factory=list)
    id: str = ""
    extra: dict = Field(default_factory=dict)


def _read_meta(path: Path, raw: str) -> _Metadata:
    """Parse and check a candidate's metadata; errors name the file and the field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise CandidateError(f"{path}: the 'eep' metadata is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise CandidateError(f"{path}: the 'eep' metadata is a JSON {type(data).__name__}, expected an object")
    try:
        return _Metadata.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "metadata"
        value = f" (got {err['input']!r})" if field in data else ""
        raise CandidateError(f"{path}: metadata field {field!r}: {err['msg'].lower()}{value}") from None


def _as_matrix(t: torch.Tensor | Sequence) -> torch.Tensor:
    t = torch.as_tensor(t).detach().to(device="cpu", dtype=torch.float32)
    if t.dim() != 2:
        raise CandidateError(f"expected a [keep, num_experts] matrix, got shape {tuple(t.shape)}")
    return t.contiguous()


def _is_one_hot(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all() and (t.sum(dim=1) == 1).all())

