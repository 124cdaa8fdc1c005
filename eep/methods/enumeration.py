"""Layer-wise enumeration pruning (Lu et al. 2024): per layer the kept subset that best reproduces the layer's output.

For MoE layer ``l`` with calibration inputs ``X: [T, H]`` the target is the routed output of the original layer,
``Z = sum_{e in topk(x)} g_e(x) f_e(x)`` (top-``k`` of all ``E`` experts; every ``f_e(X)`` computed once by the
model's experts module); a kept subset ``S`` (``|S| = E'``) gives
``Z'_S`` with the dropped experts masked out of routing by eep's rule and the family's top-``k'`` over the rest (the
physically pruned layer). The chosen ``S`` minimises ``sum_batches ||Z - Z'_S||_F`` (batches of ``chunk_tokens``
tokens); shared experts cancel in the difference. ``enumeration`` uses the original model's ``X`` for every layer;
``enumeration_progressive`` prunes layer by layer, re-running calibration through the layers already pruned.

Fallback when the candidates (``C(E, E')``, or ``prod_g C(E/n_group, E'/n_group)`` per expert group) exceed
``max_subsets``: ``fallback="greedy"`` (default) is greedy backward elimination (from all ``E`` experts, repeatedly
drop the expert whose removal raises the error least, ``O(E^2)`` evaluations; not available for grouped routers,
whose subsets must stay balanced); ``fallback="sample"`` scores ``max_subsets`` seeded uniformly random subsets.
``info`` says which ran per layer.
"""
from __future__ import annotations

import itertools
import logging
import math

import torch

from eep.arch import MoELayer
from eep.genome import Genome, subset_count
from eep.materialize import Materializer
from eep.methods.registry import MethodError, register
from eep.methods.result import MethodResult
from eep.methods.selection import keep_top, per_block
from eep.methods.statistics import collect, expert_outputs, route_subset

log = logging.getLogger(__name__)


def routed_output(materializer: Materializer, layer: MoELayer, x: torch.Tensor, outputs: torch.Tensor,
                  kept: torch.Tensor, top_k: int) -> torch.Tensor:
    """``float[T, H]``: ``sum_j w_j f_{s_j}(x)`` over the family's top-``k`` routing among ``kept`` experts only, for
    ``x: [T, H]`` with every expert's output ``outputs: float[E, T, H]`` precomputed."""
    weights, slots = route_subset(materializer, layer, x, kept, top_k)
    tokens = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return (weights.float().unsqueeze(-1) * outputs[slots, tokens]).sum(1)


class LayerProblem:
    """One layer's enumeration problem: inputs in batches, every expert's output on them (``E * T * H`` floats, the
    memory this costs), the targets, and the error of a kept subset."""

    def __init__(self, materializer: Materializer, layer: MoELayer, inputs: torch.Tensor, top_k: int,
                 chunk_tokens: int):
        self.materializer, self.layer, self.top_k = materializer, layer, top_k
        num_experts = materializer.adapter.num_experts
        everyone = torch.arange(num_experts, device=inputs.device)
        adapter = materializer.adapter
        self.chunks = list(inputs.to(adapter.expert_dtype).split(chunk_tokens))
        self.outputs = [torch.stack([expert_outputs(layer, c, e, adapter).float() for e in range(num_experts)])
                        for c in self.chunks]
        self.targets = [routed_output(materializer, layer, c, f, everyone, materializer.adapter.top_k)
                        for c, f in zip(self.chunks, self.outputs)]
        self.evaluated = 0

    def error(self, kept: list[int]) -> float:
        """``sum_batches ||Z - Z'_S||_F`` for ``S = kept``."""
        idx = torch.tensor(sorted(kept), device=self.chunks[0].device)
        self.evaluated += 1
        return sum(torch.linalg.norm(z - routed_output(self.materializer, self.layer, c, f, idx, self.top_k)).item()
                   for c, f, z in zip(self.chunks, self.outputs, self.targets))


def _exhaustive(problem: LayerProblem, blocks) -> list[int]:
    subsets = itertools.product(*(itertools.combinations(b.tolist(), share) for b, share in blocks))
    return min((sorted(itertools.chain(*combo)) for combo in subsets), key=problem.error)


def _greedy(problem: LayerProblem, num_experts: int, num_kept: int) -> list[int]:
    kept = list(range(num_experts))
    while len(kept) > num_kept:
        drop = min(kept, key=lambda e: problem.error([k for k in kept if k != e]))
        kept.remove(drop)
    return kept


def _sampled(problem: LayerProblem, blocks, tries: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed + problem.layer.index)
    draws = {tuple(sorted(itertools.chain(*(b[torch.randperm(len(b), generator=gen)[:share]].tolist()
                                            for b, share in blocks)))) for _ in range(tries)}
    return list(min(sorted(draws), key=lambda s: problem.error(list(s))))


def subsets_scored(num_experts: int, num_kept: int, expert_groups: int = 1, max_subsets: int = 10000,
                   fallback: str = "greedy") -> int | None:
    """How many subsets :func:`best_subset` scores per layer: ``C(E, E')`` (per expert block) when that is at most
    ``max_subsets``; greedy backward elimination's ``sum_{n = E'+1}^{E} n`` (one router block only); the
    ``max_subsets`` samples of ``fallback="sample"``; None where no rule applies (the method raises)."""
    count = subset_count(num_experts, num_kept, expert_groups)
    if count <= max_subsets:
        return count
    if fallback == "greedy" and expert_groups == 1:
        return (num_experts * (num_experts + 1) - num_kept * (num_kept + 1)) // 2
    return max_subsets if fallback == "sample" else None


def best_subset(problem: LayerProblem, num_kept: int, max_subsets: int, fallback: str, seed: int) -> tuple[list, str]:
    """The kept subset of least error and how it was found (``exhaustive``, ``greedy`` or ``sample``)."""
    blocks = per_block(problem.materializer, problem.layer, num_kept)
    count = math.prod(math.comb(len(b), share) for b, share in blocks)
    if count <= max_subsets:
        return _exhaustive(problem, blocks), "exhaustive"
    if fallback == "greedy" and len(blocks) == 1:
        return _greedy(problem, problem.materializer.adapter.num_experts, num_kept), "greedy"
    if fallback == "sample":
        return _sampled(problem, blocks, max_subsets, seed), "sample"
    raise MethodError(f"{count} candidate subsets exceed max_subsets={max_subsets} and fallback={fallback!r} is not "
                      f"available here; use fallback='sample' (grouped routers) or 'greedy', or raise max_subsets")


def _enumerate(name: str, materializer: Materializer, calibration: dict, num_kept: int, top_k: int, seed: int,
               progressive: bool, max_subsets: int, fallback: str, chunk_tokens: int) -> MethodResult:
    num_experts = materializer.adapter.num_experts
    kept = keep_top(materializer, torch.zeros(len(materializer.layers), num_experts), num_kept)  # placeholders
    stats = collect(materializer, calibration)
    found, evaluated = [], []
    for layer in materializer.layers:
        if progressive and layer.index > 0:  # inputs through the layers pruned so far (later ones do not matter)
            with materializer.applied(Genome.pruning(kept, num_experts, top_k)):
                stats = collect(materializer, calibration)
        problem = LayerProblem(materializer, layer, stats[layer.index].inputs, top_k, chunk_tokens)
        kept[layer.index], how = best_subset(problem, num_kept, max_subsets, fallback, seed)
        found.append(how)
        evaluated.append(problem.evaluated)
        log.info("%s layer %d: keep %s (%s, %d subsets scored)", name, layer.index, kept[layer.index], how,
                 problem.evaluated)
    genome = Genome.pruning(kept, num_experts, top_k)
    return MethodResult(name, genome, info={"kept": kept, "search": found, "subsets_scored": evaluated,
                                            "max_subsets": max_subsets, "fallback": fallback,
                                            "semantics": "pruning: eep's rule = the physically pruned model"})


@register("enumeration", kind="enumeration", seedable=True,
          summary="per layer, the subset whose layer output is closest to the original's")
def enumeration(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0,
                max_subsets: int = 10000, fallback: str = "greedy", chunk_tokens: int = 1024) -> MethodResult:
    """Layer-wise enumeration on the original model's calibration inputs (module docstring)."""
    return _enumerate("enumeration", materializer, calibration, num_kept, top_k, seed, False, max_subsets, fallback,
                      chunk_tokens)


@register("enumeration_progressive", kind="enumeration", seedable=True,
          summary="enumeration layer by layer through the already pruned layers")
def enumeration_progressive(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int,
                            seed: int = 0, max_subsets: int = 10000, fallback: str = "greedy",
                            chunk_tokens: int = 1024) -> MethodResult:
    """Enumeration layer by layer, each layer's inputs taken through the layers already pruned (module docstring)."""
    return _enumerate("enumeration_progressive", materializer, calibration, num_kept, top_k, seed, True, max_subsets,
                      fallback, chunk_tokens)
