"""The EEP genome: per layer group a router-mapping and an expert-merging matrix, and the active top-k'.

A genome over a model with ``L`` MoE layers of ``E`` routed experts keeps ``E'`` experts per layer:

- ``router_map`` ``W_RM: float[G, E', E]``: new routing probabilities ``p' = W_RM p`` (after the softmax, before
  top-k' and renormalisation);
- ``merge`` ``W_EM: float[G, E', E]``: new expert ``j`` has weights ``sum_i W_EM[j, i] * W_i`` (W1, W2, W3);
- ``groups``: ``G`` tuples of MoE-layer indices (0-based among the MoE layers; dense layers carry nothing) that
  share one pair; every layer in exactly one group;
- ``top_k``: experts active per token;
- ``gate_rows``: where ``W_RM`` acts. False (the paper's rule): on the routing probabilities, as above; a merging
  genome's export then refits its gates by least squares (not exact). True: on the router's gate rows, new logits
  ``z' = W_RM z`` (the gate ``W_RM @ W_gate``, and ``W_RM @ b`` for a router bias), then the family's own routing over
  the ``E'`` new experts; a different model, exported exactly (docs/methods.md section 1.2).

A layer group is a *pruning* group when every row of ``W_EM`` is one-hot and ``W_RM == W_EM``: it just keeps a
subset of experts. The genome knows no model; :mod:`eep.materialize` turns it into a patched model.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


class GenomeError(ValueError):
    """An invalid genome: the message names the field, the value and what is valid."""


def depth_groups(num_layers: int, num_groups: int | None) -> tuple[tuple[int, ...], ...]:
    """``num_groups`` contiguous groups of (almost) equal size over ``num_layers`` layers; None = one per layer."""
    if num_groups is None:
        return tuple((i,) for i in range(num_layers))
    if not 1 <= num_groups <= num_layers:
        raise GenomeError(f"layer_groups={num_groups} must be between 1 and the number of MoE layers ({num_layers})")
    bounds = [round(g * num_layers / num_groups) for g in range(num_groups + 1)]
    return tuple(tuple(range(bounds[g], bounds[g + 1])) for g in range(num_groups))


def subset_count(num_experts: int, num_kept: int, expert_groups: int = 1) -> int:
    """How many kept subsets one layer (group) can take: ``C(E / b, E' / b) ** b``, the same number of experts kept
    in each of ``b`` contiguous expert blocks (``b = 1`` except for grouped routers)."""
    return math.comb(num_experts // expert_groups, num_kept // expert_groups) ** expert_groups


def _one_hot(kept: Sequence[int], num_experts: int) -> torch.Tensor:
    """``float[E', E]`` with row ``j`` one-hot at ``kept[j]``."""
    out = torch.zeros(len(kept), num_experts)
    out[torch.arange(len(kept)), torch.as_tensor(list(kept), dtype=torch.long)] = 1.0
    return out


@dataclass(frozen=True, eq=False)
class Genome:
    """``router_map``, ``merge: float32[G, E', E]``; ``groups``: G tuples of MoE-layer indices; ``top_k``;
    ``gate_rows``: ``W_RM`` maps the gate rows instead of the probabilities (no meaning for pruning groups)."""

    router_map: torch.Tensor
    merge: torch.Tensor
    top_k: int
    groups: tuple[tuple[int, ...], ...]
    gate_rows: bool = False   # a class default too: genomes pickled before the field unpickle with False

    def __post_init__(self):
        object.__setattr__(self, "router_map", torch.as_tensor(self.router_map, dtype=torch.float32).detach().cpu())
        object.__setattr__(self, "merge", torch.as_tensor(self.merge, dtype=torch.float32).detach().cpu())
        object.__setattr__(self, "groups", tuple(tuple(int(i) for i in g) for g in self.groups))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "gate_rows", bool(self.gate_rows))
        self.check()
        self._num_layers  # noqa: B018  (cached once: an apply reads it)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, num_layers: int, num_experts: int, top_k: int, layer_groups: int | None = None) -> Genome:
        """Every layer keeps all ``E`` experts unchanged (``W_RM = W_EM = I``)."""
        groups = depth_groups(num_layers, layer_groups)
        return cls.pruning([list(range(num_experts))] * len(groups), num_experts, top_k, groups)

    @classmethod
    def pruning(cls, kept: Sequence[Sequence[int]], num_experts: int, top_k: int,
                groups: Sequence[Sequence[int]] | None = None) -> Genome:
        """Keep ``kept[g]`` (E' expert indices) in layer group ``g``; groups default to one per layer."""
        groups = tuple(tuple(g) for g in groups) if groups is not None else tuple((i,) for i in range(len(kept)))
        if len(groups) != len(kept):
            raise GenomeError(f"{len(kept)} kept subsets for {len(groups)} layer groups: give one per group")
        sizes = {len(k) for k in kept}
        if len(sizes) != 1:
            raise GenomeError(f"kept subsets have sizes {sorted(sizes)}: every layer keeps the same E'")
        for g, subset in enumerate(kept):
            if len(set(subset)) != len(subset):
                raise GenomeError(f"layer group {g} keeps expert(s) twice: {list(subset)}")
            bad = [e for e in subset if not 0 <= e < num_experts]
            if bad:
                raise GenomeError(f"layer group {g} keeps experts {bad} outside 0..{num_experts - 1}")
        mats = torch.stack([_one_hot(k, num_experts) for k in kept])
        genome = cls(mats, mats.clone(), top_k, groups)
        genome.__dict__["_kept_per_group"] = tuple(tuple(sorted(int(e) for e in k)) for k in kept)  # known here
        genome.layer_masks, genome.is_pruning  # noqa: B018  (known with the genome: an apply only reads them)
        return genome

    @classmethod
    def merging(cls, router_map: torch.Tensor, merge: torch.Tensor, top_k: int,
                groups: Sequence[Sequence[int]] | None = None, gate_rows: bool = False) -> Genome:
        """A genome from explicit matrices ``float[G, E', E]`` (groups default to one per layer)."""
        groups = groups if groups is not None else tuple((i,) for i in range(len(router_map)))
        return cls(router_map, merge, top_k, tuple(tuple(g) for g in groups), gate_rows)

    def with_matrices(self, router_map: torch.Tensor, merge: torch.Tensor) -> Genome:
        """A genome with the same top-k', groups and ``gate_rows`` and new matrices ``float[G, E', E]``."""
        return Genome(router_map, merge, self.top_k, self.groups, self.gate_rows)

    def with_gate_rows(self, gate_rows: bool) -> Genome:
        """The same matrices with ``W_RM`` acting on the gate rows (True) or on the probabilities (False)."""
        return self if gate_rows == self.gate_rows else Genome(self.router_map, self.merge, self.top_k, self.groups,
                                                               gate_rows)

    @property
    def exports_exactly(self) -> bool:
        """Its vanilla export is the candidate: pruning genomes and gate-rows genomes (the others' gates are refit)."""
        return self.is_pruning or self.gate_rows

    @property
    def kind(self) -> str:
        """``pruning``, ``merging`` or ``merging (gate rows)``."""
        return "pruning" if self.is_pruning else "merging (gate rows)" if self.gate_rows else "merging"

    @property
    def maps_gate_rows(self) -> bool:
        """Some merging group routes by ``W_RM @ W_gate`` (``gate_rows`` has no effect on pruning groups)."""
        return self.gate_rows and not self.is_pruning

    # ------------------------------------------------------------------ shape and kind
    @property
    def num_layers(self) -> int:
        return self._num_layers

    @cached_property
    def _num_layers(self) -> int:  # filled by __post_init__; computed here for genomes unpickled from older versions
        return sum(len(g) for g in self.groups)

    @property
    def num_experts(self) -> int:
        """``E``, the experts of the original model."""
        return self.router_map.shape[2]

    @property
    def num_kept(self) -> int:
        """``E'``, the experts of the candidate."""
        return self.router_map.shape[1]

    def group_of(self, layer: int) -> int:
        """Index of the group that holds MoE layer ``layer``."""
        for g, members in enumerate(self.groups):
            if layer in members:
                return g
        raise GenomeError(f"MoE layer {layer} is in no layer group (the genome covers {self.num_layers} layers)")

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_RM, W_EM): float[E', E]`` of MoE layer ``layer``."""
        g = self.group_of(layer)
        return self.router_map[g], self.merge[g]

    @cached_property
    def _kept_per_group(self) -> tuple[tuple[int, ...] | None, ...]:
        """Per group: the sorted kept experts if it is a pruning group (one-hot rows at distinct experts, ``W_RM ==
        W_EM``), else None."""
        m = self.merge
        one_hot = ((m == 0) | (m == 1)).all(dim=2) & (m.sum(dim=2) == 1)
        pruning = one_hot.all(dim=1) & (m == self.router_map).flatten(1).all(dim=1)
        kept = m.argmax(dim=2).tolist()
        return tuple(tuple(sorted(k)) if p and len(set(k)) == len(k) else None  # a repeated expert merges
                     for k, p in zip(kept, pruning.tolist()))

    @cached_property
    def is_pruning(self) -> bool:
        """Every group is a pruning group."""
        return all(k is not None for k in self._kept_per_group)

    def kept(self, layer: int) -> list[int] | None:
        """Sorted expert indices that MoE layer ``layer`` keeps, or None if its group is not a pruning group."""
        kept = self._kept_per_group[self.group_of(layer)]
        return None if kept is None else list(kept)

    @cached_property
    def layer_masks(self) -> torch.Tensor:
        """``bool[L, E]``: per MoE layer, the experts some row of ``W_RM`` uses (the others are masked out)."""
        used = (self.router_map != 0).any(dim=1)
        return used[[self.group_of(layer) for layer in range(self.num_layers)]]

    def used_experts(self, layer: int) -> torch.Tensor:
        """``bool[E]``: experts that some row of ``W_RM`` uses (the others are masked out of routing)."""
        return self.layer_masks[layer]

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise :class:`GenomeError` on inconsistent shapes, counts, groups or weights."""
        rm, em = self.router_map, self.merge
        if rm.dim() != 3 or rm.shape != em.shape:
            raise GenomeError(f"router_map {tuple(rm.shape)} and merge {tuple(em.shape)} must both be [G, E', E]")
        if rm.shape[0] != len(self.groups):
            raise GenomeError(f"{rm.shape[0]} matrix pairs for {len(self.groups)} layer groups")
        n_kept, n_experts = rm.shape[1:]
        if n_kept > n_experts:
            raise GenomeError(f"E'={n_kept} kept experts is more than the model's E={n_experts}")
        if n_kept < 1:
            raise GenomeError("E' must be at least 1")
        if not 1 <= self.top_k <= n_kept:
            raise GenomeError(f"top_k'={self.top_k} must be between 1 and E'={n_kept}")
        layers = sorted(i for g in self.groups for i in g)
        if layers != list(range(len(layers))) or any(len(g) == 0 for g in self.groups):
            raise GenomeError(f"layer groups {self.groups} must split the MoE layers 0..L-1, each layer exactly once")
        if not (torch.isfinite(rm).all() and torch.isfinite(em).all()):
            raise GenomeError("router_map and merge must be finite")
        if (rm < 0).any():
            raise GenomeError("router_map has negative entries: mapped routing probabilities must be >= 0")
        if (rm.sum(2) == 0).any():
            raise GenomeError("a row of router_map is all zero: every kept expert needs some routing probability")

    def validate_for(self, num_layers: int, num_experts: int) -> None:
        """Check the genome against a model with ``num_layers`` MoE layers of ``num_experts`` experts."""
        if self.num_experts != num_experts:
            raise GenomeError(f"genome is over E={self.num_experts} experts but the model has {num_experts}")
        if self.num_layers != num_layers:
            raise GenomeError(f"genome covers {self.num_layers} MoE layers but the model has {num_layers}")

    # ------------------------------------------------------------------ identity of content
    def canonical_layers(self) -> list[torch.Tensor]:
        """Per MoE layer ``float[E', 2E]``: the rows ``[W_RM | W_EM]`` sorted lexicographically.

        Row order carries no meaning (new expert ``j`` is router row ``j`` and merge row ``j``), nor does the grouping
        of layers, so two genomes with equal canonical layers and top-k' compute the same model.
        """
        out = []
        for layer in range(self.num_layers):
            rows = torch.cat(self.layer(layer), dim=1).tolist()
            out.append(torch.tensor(sorted(rows), dtype=torch.float32))
        return out

    @cached_property
    def _hash(self) -> str:
        rows = "gate;" if self.maps_gate_rows else ""   # absent for the probability rule: hashes of old runs stand
        h = hashlib.sha256(f"E={self.num_experts};k={self.top_k};{rows}".encode())
        for rows in self.canonical_layers():
            h.update(rows.numpy().tobytes())
        return h.hexdigest()[:16]

    def content_hash(self) -> str:
        """SHA-256 (hex, 16 chars) of the canonical layers, top-k' and (merging genomes) ``gate_rows``; equal for
        equal models."""
        return self._hash

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """JSON-ready: pruning genomes as kept subsets, others as full matrices (float32 round-trips exactly)."""
        base = {"num_experts": self.num_experts, "top_k": self.top_k, "groups": [list(g) for g in self.groups],
                "hash": self.content_hash()}
        if self.is_pruning:
            return {**base, "kind": "pruning", "kept": [self.kept(g[0]) for g in self.groups]}
        rows = {"gate_rows": True} if self.maps_gate_rows else {}
        return {**base, "kind": "merging", **rows, "router_map": self.router_map.tolist(),
                "merge": self.merge.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Genome:
        if data.get("kind") == "pruning":
            return cls.pruning(data["kept"], data["num_experts"], data["top_k"], data["groups"])
        if data.get("kind") == "merging":
            return cls.merging(torch.tensor(data["router_map"]), torch.tensor(data["merge"]), data["top_k"],
                               data["groups"], bool(data.get("gate_rows", False)))
        raise GenomeError(f"genome JSON has kind={data.get('kind')!r}; expected 'pruning' or 'merging'")

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Genome:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ optimiser representation
    def to_vector(self) -> torch.Tensor:
        """``float[G * 2 * E' * E]``: ``[W_RM, W_EM]`` per group, flattened (the merging-phase encoding)."""
        return torch.stack([self.router_map, self.merge], dim=1).reshape(-1)

    def with_vector(self, vector) -> Genome:
        """A genome of the same shape, groups and top-k' from a :meth:`to_vector`-style array."""
        mats = torch.as_tensor(vector, dtype=torch.float32).reshape(len(self.groups), 2, self.num_kept,
                                                                     self.num_experts)
        return self.with_matrices(mats[:, 0], mats[:, 1])

    def __eq__(self, other) -> bool:
        return isinstance(other, Genome) and self.content_hash() == other.content_hash()

    def __hash__(self) -> int:
        return hash(self.content_hash())

    def __repr__(self) -> str:
        return (f"Genome({self.kind}, E={self.num_experts}->E'={self.num_kept}, top_k'={self.top_k}, "
                f"{len(self.groups)} groups over {self.num_layers} layers, hash={self.content_hash()})")
