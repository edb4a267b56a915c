"""Book-keeping every strategy shares: ids, the pending map, the archive, dedup, the generator.

Strategies talk to evaluators only through ids (Ray Tune's habit): `ask` puts a candidate under
a fresh id into `pending`; `tell` moves it into the archive with its score, in whatever order
results come back. Everything here serialises to JSON types and torch tensors.

Dedup key: `dedup_key` hashes each layer's (M, R) rows after sorting them jointly, so two
candidates that differ only in slot order (the same kept experts in another order, which compute
the same function) count as identical and are evaluated once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from eep.candidate import Candidate
from eep.result import FitnessResult


@dataclass
class Evaluated:
    """An archived candidate with its search score (nan when the evaluation failed).

    A `rejected` one was stopped early (eep.rejection): its score is partial, so it is kept
    (never asked again) but is neither a parent nor a finalist.
    """

    candidate: Candidate
    score: float
    failed: bool
    order: int  # position in the archive, i.e. the order results were told
    rejected: bool = False


class SearchState:
    """Ids, pending candidates, the archive of told results, content hashes and the generator."""

    def __init__(self, seed: int, id_prefix: str) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.id_prefix = id_prefix
        self.next_id = 0
        self.archive: list[Evaluated] = []
        self.pending: dict[str, Candidate] = {}
        self._pending_key: dict[str, str] = {}  # id -> dedup key
        self._told_by_key: dict[str, Evaluated] = {}  # dedup key -> first archived
        self._pending_keys: set[str] = set()

    # ----------------------------------------------------------------------------- queries
    def is_known(self, key: str) -> bool:
        """True when a candidate with this dedup key is archived or pending."""
        return key in self._told_by_key or key in self._pending_keys

    def told(self, key: str) -> Evaluated | None:
        """The archived evaluation of a candidate with this dedup key, if any."""
        return self._told_by_key.get(key)

    def successful(self) -> list[Evaluated]:
        """Archived candidates scored on the whole split, in the order they were told."""
        return [e for e in self.archive if not e.failed and not e.rejected]

    # ----------------------------------------------------------------------------- changes
    def add_pending(self, candidate: Candidate, key: str) -> Candidate:
        """Give `candidate` the next id and hold it until its result is told."""
        cid = f"{self.id_prefix}{self.next_id:05d}"
        self.next_id += 1
        # The proposal is the strategy's own fresh object; setting the id in place saves a
        # second validation of every matrix (what `with_meta` would cost).
        candidate.id = cid
        self.pending[cid] = candidate
        self._pending_key[cid] = key
        self._pending_keys.add(key)
        return candidate

    def resolve(self, candidate: Candidate, result: FitnessResult) -> Evaluated:
        """Move a pending candidate into the archive with its result."""
        cid = candidate.id
        if cid not in self.pending:
            raise KeyError(f"tell: candidate id {cid!r} was not asked, or was told already")
        ours = self.pending[cid]
        if candidate is not ours and dedup_key(candidate) != self._pending_key[cid]:
            raise ValueError(f"tell: candidate {cid!r} differs from the one that was asked")
        # A non-finite score cannot be ranked; it is recorded as a failure, like an exception.
        failed = result.failed or not math.isfinite(result.score)
        score = float("nan") if failed else float(result.score)
        del self.pending[cid]
        key = self._pending_key.pop(cid)
        self._pending_keys.discard(key)
        entry = Evaluated(ours, score, failed, len(self.archive), result.rejected and not failed)
        self.archive.append(entry)
        self._told_by_key.setdefault(key, entry)
        return entry

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """JSON types and tensors only; restores with `load_state_dict`."""
        return {
            "rng": rng_state(self.rng),
            "id_prefix": self.id_prefix,
            "next_id": self.next_id,
            "archive": [
                {
                    "candidate": candidate_state(e.candidate),
                    "score": None if e.failed else e.score,
                    "failed": e.failed,
                    "rejected": e.rejected,
                }
                for e in self.archive
            ],
            "pending": [candidate_state(c) for c in self.pending.values()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (the generator included)."""
        set_rng_state(self.rng, state["rng"])
        self.id_prefix = state["id_prefix"]
        self.next_id = int(state["next_id"])
        self.archive, self.pending = [], {}
        self._pending_key, self._told_by_key, self._pending_keys = {}, {}, set()
        for i, item in enumerate(state["archive"]):
            candidate = candidate_from_state(item["candidate"])
            failed = bool(item["failed"])
            score = float("nan") if failed else float(item["score"])
            entry = Evaluated(candidate, score, failed, i, bool(item.get("rejected", False)))
            self.archive.append(entry)
            self._told_by_key.setdefault(dedup_key(candidate), entry)
        for item in state["pending"]:
            candidate = candidate_from_state(item)
            key = dedup_key(candidate)
            self.pending[candidate.id] = candidate
            self._pending_key[candidate.id] = key
            self._pending_keys.add(key)


def dedup_key(candidate: Candidate) -> str:
    """Hash of what the candidate computes, blind to slot order (joint row permutations)."""
    h = hashlib.sha256()
    h.update(
        json.dumps([candidate.num_experts, candidate.top_k, candidate.router_mapping]).encode()
    )
    for r, m in zip(candidate.router_map, candidate.expert_merge, strict=True):
        # Row i is (M[i], R[i]) as float32 bytes (+ 0.0 folds -0.0 into 0.0); sorting the rows'
        # bytes is an arbitrary but fixed order, which is all a canonical form needs.
        rows = np.concatenate([m.numpy(), r.numpy()], axis=1) + np.float32(0.0)
        width = rows.shape[1] * rows.itemsize
        raw = rows.tobytes()
        h.update(str(rows.shape).encode())
        h.update(b"".join(sorted(raw[i : i + width] for i in range(0, len(raw), width))))
    return h.hexdigest()[:20]


def candidate_state(candidate: Candidate) -> dict:
    """A candidate as JSON types and tensors."""
    return {
        "router_map": list(candidate.router_map),
        "expert_merge": list(candidate.expert_merge),
        "num_experts": candidate.num_experts,
        "top_k": candidate.top_k,
        "router_mapping": candidate.router_mapping,
        "model_id": candidate.model_id,
        "phase": candidate.phase,
        "parents": list(candidate.parents),
        "id": candidate.id,
        "extra": dict(candidate.extra),
    }


def candidate_from_state(state: dict) -> Candidate:
    """The candidate `candidate_state` described."""
    return Candidate(
        router_map=[torch.as_tensor(t).clone() for t in state["router_map"]],
        expert_merge=[torch.as_tensor(t).clone() for t in state["expert_merge"]],
        num_experts=int(state["num_experts"]),
        top_k=state["top_k"],
        router_mapping=state["router_mapping"],
        model_id=state["model_id"],
        phase=state["phase"],
        parents=tuple(state["parents"]),
        id=state["id"],
        extra=dict(state["extra"]),
    )


def rng_state(rng: np.random.Generator) -> dict:
    """The generator's state with its 128-bit integers as strings (JSON-safe everywhere)."""
    st = rng.bit_generator.state
    return {
        "bit_generator": st["bit_generator"],
        "state": str(st["state"]["state"]),
        "inc": str(st["state"]["inc"]),
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    """Put the generator back into a state `rng_state` returned."""
    if state["bit_generator"] != rng.bit_generator.state["bit_generator"]:
        raise ValueError(f"generator state is for {state['bit_generator']}, not PCG64")
    rng.bit_generator.state = {
        "bit_generator": state["bit_generator"],
        "state": {"state": int(state["state"]), "inc": int(state["inc"])},
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }
