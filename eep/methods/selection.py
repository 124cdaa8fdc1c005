"""Statistic pruning baselines: random, frequency, soft activation and REAP keep the best-scored experts per layer."""
from __future__ import annotations

import logging

import torch

from eep.arch import MoEAdapter, MoELayer
from eep.genome import Genome
from eep.materialize import Materializer
from eep.methods.registry import MethodError, register
from eep.methods.result import MethodResult
from eep.methods.statistics import LayerStats, collect, expert_outputs

log = logging.getLogger(__name__)


def expert_blocks(materializer: Materializer, layer: MoELayer) -> list[torch.Tensor]:
    """The contiguous expert groups the router routes over (``adapter.expert_groups``; one block for most)."""
    adapter = materializer.adapter
    return list(torch.arange(adapter.num_experts).chunk(adapter.expert_groups))


def per_block(materializer: Materializer, layer: MoELayer, num_kept: int) -> list[tuple[torch.Tensor, int]]:
    """``[(block experts, how many to keep there)]``: ``E'`` split equally over the router's expert groups, each
    keeping at least 2 (a DeepSeek group scores by its top 2); MethodError when ``E'`` does not split so."""
    blocks = expert_blocks(materializer, layer)
    if len(blocks) == 1:
        return [(blocks[0], num_kept)]
    share, rest = divmod(num_kept, len(blocks))
    if rest or share < 2:
        raise MethodError(f"{materializer.adapter.name()} routes over {len(blocks)} expert groups: E'={num_kept} must "
                          f"be a multiple of {len(blocks)} with at least 2 per group (pick per group)")
    return [(b, share) for b in blocks]


def keep_top(materializer: Materializer, scores: torch.Tensor, num_kept: int) -> list[list[int]]:
    """Per MoE layer the ``E'`` highest-scored experts (``scores: float[L, E]``; ties: lower index), per expert group
    where the router has groups."""
    kept = []
    for layer, row in zip(materializer.layers, scores):
        chosen = []
        for block, share in per_block(materializer, layer, num_kept):
            order = torch.sort(row[block].double(), descending=True, stable=True).indices
            chosen += block[order[:share]].tolist()
        kept.append(sorted(chosen))
    return kept


def pruning_result(method: str, materializer: Materializer, scores: torch.Tensor, num_kept: int, top_k: int,
                   **info) -> MethodResult:
    """A pruning :class:`MethodResult` keeping the top-scored experts (scores in ``info`` for the record)."""
    kept = keep_top(materializer, scores, num_kept)
    genome = Genome.pruning(kept, materializer.adapter.num_experts, top_k)
    return MethodResult(method, genome, info={"kept": kept, "scores": scores.tolist(),
                                              "semantics": "pruning: eep's rule = the physically pruned model", **info})


@register("random", kind="baseline", seedable=True, needs_calibration=False,
          summary="a uniformly random subset per layer")
def random_subsets(materializer: Materializer, calibration: dict | None, *, num_kept: int, top_k: int, seed: int = 0):
    """A uniformly random subset per layer (per expert group where the router has groups), seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(materializer.layers), materializer.adapter.num_experts, generator=gen)
    return pruning_result("random", materializer, scores, num_kept, top_k)


def _scored(name: str, materializer: Materializer, calibration: dict, num_kept: int, top_k: int,
            score) -> MethodResult:
    stats = collect(materializer, calibration)
    scores = torch.stack([score(layer, s) for layer, s in zip(materializer.layers, stats)])
    return pruning_result(name, materializer, scores, num_kept, top_k)


@register("frequency", kind="statistic", seedable=True,
          summary="the experts chosen most often in top-k on calibration tokens")
def frequency(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0):
    """Keep the experts chosen most often in the original top-k on the calibration tokens."""
    return _scored("frequency", materializer, calibration, num_kept, top_k, lambda layer, s: s.frequency())


@register("soft_activation", kind="statistic", seedable=True,
          summary="the experts with the largest summed routing probability")
def soft_activation(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0):
    """Keep the experts with the largest summed routing probability ``sum_t p_t[e]`` (family rule at k = E)."""
    return _scored("soft_activation", materializer, calibration, num_kept, top_k,
                   lambda layer, s: s.soft_activation())


def reap_saliency(layer: MoELayer, stats: LayerStats, num_experts: int,
                  adapter: MoEAdapter | None = None) -> torch.Tensor:
    """``float[E]``: REAP saliency ``mean over tokens t routed to e of g_e(x_t) * ||f_e(x_t)||_2`` (0 if never)."""
    x = stats.inputs.to(adapter.expert_dtype if adapter is not None else stats.inputs.dtype)
    out = torch.zeros(num_experts)
    for e in range(num_experts):
        tokens, pos = torch.where(stats.indices == e)
        if len(tokens):
            norms = expert_outputs(layer, x[tokens], e, adapter).float().norm(dim=-1)
            out[e] = (stats.weights[tokens, pos] * norms).mean()
    return out


@register("reap", kind="statistic", seedable=True,
          summary="the most salient experts: mean over routed tokens of g_j(x) * ||f_j(x)||")
def reap(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0):
    """Keep the experts of highest REAP saliency (router-weighted expert activation norm, Cerebras 2025)."""
    num_experts = materializer.adapter.num_experts
    return _scored("reap", materializer, calibration, num_kept, top_k,
                   lambda layer, s: reap_saliency(layer, s, num_experts, materializer.adapter))
