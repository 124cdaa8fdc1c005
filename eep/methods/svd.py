"""MC-SMoE-style compression without gradients: M-SMoE merge, then a truncated SVD of every merged expert's matrices.

Each merged expert ``g`` (``W_g = sum_i W_EM[g, i] W_i`` over the permutation-aligned members) has its
``W1, W3: [I, H]`` and ``W2: [H, I]`` replaced by rank-``r`` reconstructions ``U_r S_r V_r^T`` (``rank`` given, or the
smallest ``r`` keeping ``energy`` of ``sum s^2``). The reconstruction is written into the slot of the group's dominant
(an :class:`ExpertRewrite`, not function-preserving) and ``W_EM`` row ``g`` is one-hot there, so the materialiser and
:func:`eep.export.export` both carry the compressed weights; ``W_RM`` is M-SMoE's (ones at the members). A factored
format would store ``r (m + n)`` numbers per matrix instead of ``m n``: ``info`` reports those bytes; a vanilla export
stores the dense reconstruction, so it saves no bytes on disk beyond the merge itself.
"""
from __future__ import annotations

import logging

import torch

from eep.genome import Genome
from eep.materialize import Materializer, merge_experts
from eep.methods.merging import m_smoe
from eep.methods.registry import MethodError, register
from eep.methods.result import ExpertRewrite, MethodResult

log = logging.getLogger(__name__)


def truncate(matrix: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, int]:
    """Rank-``r`` SVD reconstruction of ``matrix: [m, n]`` (same dtype) and ``r``: ``rank``, else the smallest ``r``
    with ``sum_{i<r} s_i^2 >= energy * sum s^2``."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    if rank is None:
        share = (s ** 2).cumsum(0) / (s ** 2).sum().clamp_min(1e-30)
        rank = int((share < energy - 1e-9).sum()) + 1
    rank = max(1, min(rank, len(s)))
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(matrix.dtype), rank


def compress_expert(gate_up: torch.Tensor, down: torch.Tensor, rank: int | None, energy: float | None):
    """``(gate_up [2I, H], down [H, I], ranks [r_W1, r_W3, r_W2], factored numbers)`` of one merged expert."""
    size = down.shape[1]
    parts = [truncate(m, rank, energy) for m in (gate_up[:size], gate_up[size:], down)]
    factored = sum(r * sum(m.shape) for m, (_, r) in zip((gate_up[:size], gate_up[size:], down), parts))
    return torch.cat([parts[0][0], parts[1][0]]), parts[2][0], [r for _, r in parts], factored


def aligned_experts(materializer: Materializer, layer, rewrite: ExpertRewrite) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a layer's original ``(gate_up [E, 2I, H], down [E, H, I])`` with ``rewrite``'s slots written in."""
    gate_up, down = (w.clone() for w in materializer.original_experts(layer))
    for (index, expert), (new_gate_up, new_down) in rewrite.slots.items():
        if index == layer.index:
            gate_up[expert], down[expert] = new_gate_up, new_down
    return gate_up, down


@register("svd_compress", kind="compression", seedable=False,
          summary="M-SMoE, then a truncated SVD of each merged expert")
def svd_compress(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0,
                 rank: int | None = None, energy: float | None = 0.9) -> MethodResult:
    """M-SMoE merge, then truncated SVD of each merged expert at ``rank`` (or ``energy``; module docstring)."""
    if rank is None and energy is None:
        raise MethodError("svd_compress needs rank=<int> or energy=<fraction of the squared singular values>")
    merged = m_smoe(materializer, calibration, num_kept=num_kept, top_k=top_k, seed=seed)
    slots, ranks, merge = {}, [], torch.zeros_like(merged.genome.merge)
    dense = factored = 0
    for layer, groups in zip(materializer.layers, merged.info["groups"]):
        gate_up, down = aligned_experts(materializer, layer, merged.rewrite)
        ranks.append([])
        for g, members in enumerate(groups):
            row = merged.genome.merge[layer.index, g:g + 1]
            new_gate_up, new_down, r, numbers = compress_expert(merge_experts(row, gate_up)[0],
                                                                merge_experts(row, down)[0], rank, energy)
            slots[layer.index, members[0]] = (new_gate_up, new_down)
            merge[layer.index, g, members[0]] = 1.0
            ranks[-1].append(r)
            dense += (new_gate_up.numel() + new_down.numel()) * new_gate_up.element_size()
            factored += numbers * new_gate_up.element_size()
    info = {**merged.info, "ranks": ranks, "rank": rank, "energy": energy, "merged_expert_bytes_dense": dense,
            "merged_expert_bytes_factored": factored, "bytes_a_factored_format_would_save": dense - factored,
            "bytes_saved_by_vanilla_export_beyond_merge": 0,
            "note": "a vanilla export stores the dense reconstruction: no bytes saved on disk beyond the merge"}
    rewrite = ExpertRewrite("SVD reconstruction of merged experts", slots, function_preserving=False)
    return MethodResult("svd_compress", Genome.merging(merged.genome.router_map, merge, top_k), rewrite=rewrite,
                        info=info)
