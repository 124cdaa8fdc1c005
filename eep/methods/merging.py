"""Expert merging: M-SMoE (dominants, router-logit grouping, permutation alignment) and HC-SMoE (clustering).

Both express the grouping as a genome: per layer ``W_RM: float[E', E]`` with ones at a group's members and
``W_EM: float[E', E]`` with the members' frequency weights ``f_i / sum_members f`` (uniform if no member was routed),
so merged expert ``g`` is ``sum_i W_EM[g, i] W_i``. Routing semantics that runs (eep's, docs/methods.md sections 1.2 and 5.8):
``p'_g = sum of the members' p_i``, then the family's top-``k'`` over the ``E'`` groups and renormalisation; the
original M-SMoE keeps the router and runs top-``k`` over the ``E`` experts (two members of a group can both be picked
and their weights add). Merging is refused on routers that define none (DeepSeek-V3).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.optimize import linear_sum_assignment

from eep.genome import Genome
from eep.materialize import Materializer
from eep.methods.registry import MethodError, register
from eep.methods.result import ExpertRewrite, MethodResult
from eep.methods.statistics import LayerStats, collect, mean_expert_outputs

log = logging.getLogger(__name__)

SEMANTICS = ("eep: unused experts masked, p'_g = sum of the group members' p_i (W_RM ones at members), top-k' over "
             "the E' merged experts, family renormalisation (not M-SMoE's unchanged router with top-k over E)")


def check_merging(materializer: Materializer, method: str) -> None:
    if not materializer.adapter.supports_merging:
        raise MethodError(f"{method} merges experts, and {materializer.adapter.name()} routing defines no merging "
                          f"(the materialiser refuses merging genomes there): use a pruning method")


def align_permutation(ref: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``long[I]``: ``perm`` matching ``other``'s hidden neuron ``perm[a]`` to ``ref``'s neuron ``a``, maximising
    ``sum_a S[a, perm[a]]`` with ``S = W1_ref W1^T + W2_ref^T W2`` (W1 rows = the first ``I`` rows of
    ``gate_up [2I, H]``, W2 columns = columns of ``down [H, I]``) by ``scipy.optimize.linear_sum_assignment``."""
    size = ref[1].shape[1]
    sim = ref[0][:size].float() @ other[0][:size].float().T + ref[1].float().T @ other[1].float()
    _, cols = linear_sum_assignment(sim.double().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, device=ref[0].device)


def permute_expert(gate_up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same expert with hidden neurons reordered by ``perm`` (W1 and W3 rows, W2 columns): function-preserving."""
    size = down.shape[1]
    return torch.cat([gate_up[:size][perm], gate_up[size:][perm]]), down[:, perm]


def alignment_rewrite(materializer: Materializer, groups: list[list[list[int]]]) -> ExpertRewrite:
    """Permute every group member onto its group's first expert (the dominant); identity permutations are left out."""
    if not materializer.adapter.standard_experts:
        raise MethodError(f"permutation alignment needs experts laid out as gate_up_proj [E, 2I, H] and down_proj "
                          f"[E, H, I] without biases; {materializer.adapter.name()} experts are not: use align=False")
    slots = {}
    for layer, layer_groups in zip(materializer.layers, groups):
        gate_up, down = materializer.original_experts(layer)
        for members in layer_groups:
            ref = (gate_up[members[0]], down[members[0]])
            for m in members[1:]:
                perm = align_permutation(ref, (gate_up[m], down[m]))
                if not torch.equal(perm, torch.arange(len(perm), device=perm.device)):
                    slots[layer.index, m] = permute_expert(gate_up[m], down[m], perm)
    return ExpertRewrite("permutation alignment", slots, function_preserving=True)


def group_genome(groups: list[list[list[int]]], freqs: list[torch.Tensor], num_experts: int, top_k: int) -> Genome:
    """``W_RM[l, g]`` ones at the members of group ``g``, ``W_EM[l, g]`` their frequency weights (module docstring)."""
    router_map = torch.zeros(len(groups), len(groups[0]), num_experts)
    merge = torch.zeros_like(router_map)
    for l, (layer_groups, freq) in enumerate(zip(groups, freqs)):
        for g, members in enumerate(layer_groups):
            f = freq[members].float()
            f = f if f.sum() > 0 else torch.ones_like(f)
            router_map[l, g, members] = 1.0
            merge[l, g, members] = f / f.sum()
    return Genome.merging(router_map, merge, top_k)


def dominant_groups(stats: LayerStats, num_kept: int) -> list[list[int]]:
    """M-SMoE grouping: the ``E'`` most routed experts are dominants; every other expert joins the dominant whose
    router-logit column (over calibration tokens) is most cosine-similar. Each group lists its dominant first."""
    freq = stats.frequency()
    dominants = torch.sort(freq.double(), descending=True, stable=True).indices[:num_kept].tolist()
    cols = torch.nn.functional.normalize(stats.logits.float().T, dim=1)      # [E, T]
    sim = cols @ cols[dominants].T                                         # [E, E']
    groups = [[d] for d in dominants]
    for e in range(len(freq)):
        if e not in dominants:
            groups[int(sim[e].argmax())].append(e)
    return groups


def cluster_groups(features: torch.Tensor, freq: torch.Tensor, num_kept: int, metric: str) -> list[list[int]]:
    """HC-SMoE grouping: average-linkage hierarchical clustering of ``features: float[E, D]`` cut into ``E'``
    clusters (scipy); each group lists its most routed member first."""
    if num_kept == len(features):
        return [[e] for e in range(len(features))]
    labels = cut_tree(linkage(features.double().cpu().numpy(), method="average", metric=metric),
                      n_clusters=num_kept).reshape(-1)
    groups = [np.flatnonzero(labels == c).tolist() for c in range(num_kept)]
    return [sorted(g, key=lambda e: (-float(freq[e]), e)) for g in groups]


def _merge_result(name: str, materializer: Materializer, stats: list[LayerStats], groups, top_k: int, align: bool,
                  **info) -> MethodResult:
    genome = group_genome(groups, [s.frequency() for s in stats], materializer.adapter.num_experts, top_k)
    rewrite = alignment_rewrite(materializer, groups) if align else None
    return MethodResult(name, genome, rewrite=rewrite,
                        info={"groups": groups, "aligned": align, "semantics": SEMANTICS,
                              "frequency": [s.frequency().tolist() for s in stats], **info})


@register("m_smoe", kind="merging", seedable=False,
          summary="M-SMoE: dominant experts, router-logit grouping, alignment, frequency-weighted merge")
def m_smoe(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0,
           align: bool = True) -> MethodResult:
    """M-SMoE: dominants by frequency, grouping by router-logit similarity, permutation alignment of members onto
    their dominant (an :class:`ExpertRewrite` applied before merging), frequency-weighted merge."""
    check_merging(materializer, "m_smoe")
    stats = collect(materializer, calibration)
    groups = [dominant_groups(s, num_kept) for s in stats]
    return _merge_result("m_smoe", materializer, stats, groups, top_k, align)


@register("hc_smoe", kind="merging", seedable=True,
          summary="HC-SMoE: average-linkage clustering of expert outputs, frequency-weighted merge")
def hc_smoe(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0,
            metric: str = "euclidean", align: bool = False) -> MethodResult:
    """HC-SMoE: features = each expert's mean output over all calibration tokens, average-linkage clustering into
    ``E'`` groups (``metric`` as scipy's ``pdist``), frequency-weighted merge (``align`` adds M-SMoE's alignment)."""
    check_merging(materializer, "hc_smoe")
    stats = collect(materializer, calibration)
    num_experts = materializer.adapter.num_experts
    groups = [cluster_groups(mean_expert_outputs(layer, s.inputs, num_experts, materializer.adapter), s.frequency(), num_kept, metric)
              for layer, s in zip(materializer.layers, stats)]
    return _merge_result("hc_smoe", materializer, stats, groups, top_k, align, metric=metric)
