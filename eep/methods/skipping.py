"""Dynamic expert skipping (Lu et al. 2024): skip chosen experts whose weight is small next to the top one's.

Per MoE layer and rank ``r = 2..k'`` (experts sorted by routing weight, ``w_1 >= w_2 >= ...``):
``beta_r = median over calibration tokens of w_r / w_1``. At inference the rank-``r`` expert is skipped when
``w_r < beta_r * w_1`` and the kept weights are rescaled to the sum of all ``k'`` weights before skipping
(``sum = 1`` for renormalising routers such as Mixtral's, so this is the paper's renormalisation; for routers that do
not renormalise the routed mass is kept). For top-2 this is the paper's rule; for ``k' > 2`` each rank has its own
median ratio (our generalisation). ``beta = 0`` skips nothing and equals plain top-``k'`` bit-exactly.

Applied in process as a routing patch (:meth:`eep.materialize.Materializer.patch_routing`): a skipped expert gets
weight 0 (it is still computed; a kernel that drops zero-weight experts would get the speed-up). Plain transformers
ignores the betas, so an exported checkpoint routes plain top-``k'``.
"""
from __future__ import annotations

import functools
import logging

import torch

from eep.genome import Genome
from eep.materialize import Materializer, RoutingPatch
from eep.methods.registry import METHODS, register
from eep.methods.result import MethodResult
from eep.methods.statistics import collect

log = logging.getLogger(__name__)


def skip_weights(weights: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """``weights: [T, k']`` (any order) -> ``[T, k']`` with rank ``r`` zeroed where ``w_r < betas[r-2] * w_1`` and the
    kept weights rescaled to the original sum; ``betas: float[k'-1]``."""
    sorted_w, order = weights.sort(dim=-1, descending=True)
    thresholds = torch.cat([torch.zeros(1, device=betas.device), betas]).to(weights) * sorted_w[:, :1]
    keep_sorted = sorted_w >= thresholds
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))


def skip_ratios(weights: torch.Tensor) -> torch.Tensor:
    """``float[T, k'-1]``: per token and rank ``r >= 2`` the ratio ``w_r / w_1`` (``weights: [T, k']``)."""
    sorted_w = weights.float().sort(dim=-1, descending=True).values
    return sorted_w[:, 1:] / sorted_w[:, :1].clamp_min(1e-30)


def skipping_patch(betas: list[list[float]]) -> dict[int, RoutingPatch]:
    """The routing patch ``{layer: weights -> skipped weights}`` for per-layer betas (``betas[l]: k'-1 floats``)."""
    return {i: functools.partial(skip_weights, betas=torch.tensor(b, dtype=torch.float32)) for i, b in enumerate(betas)}


@register("skipping", kind="skipping", seedable=False,
          summary="dynamic skipping of later experts (w_i < beta * w_1); a routing patch")
def skipping(materializer: Materializer, calibration: dict, *, num_kept: int, top_k: int, seed: int = 0,
             prune: str = "enumeration", prune_options: dict | None = None, beta_scale: float = 1.0) -> MethodResult:
    """Per-layer betas measured on the model that will run: all experts kept (identity genome) when ``E' = E``, else
    the genome of the pruning method ``prune`` (default ``enumeration``, as in the paper) at ``E'``; ``beta_scale``
    multiplies the medians (0 = plain top-k')."""
    num_experts = materializer.adapter.num_experts
    info = {}
    if num_kept == num_experts:
        genome = Genome.identity(len(materializer.layers), num_experts, top_k)
    else:
        base = METHODS[prune](materializer, calibration, num_kept=num_kept, top_k=top_k, seed=seed,
                              **(prune_options or {}))
        genome, info = base.genome, {"pruned_by": prune, "prune_info": base.info}
    with materializer.applied(genome):
        stats = collect(materializer, calibration)
    ratios = [skip_ratios(s.weights) for s in stats]
    betas = [(r.median(dim=0).values * beta_scale).tolist() for r in ratios]
    skipped = [(r < torch.tensor(b)).float().mean(0).tolist() for r, b in zip(ratios, betas)]
    log.info("skipping betas per layer: %s", betas)
    return MethodResult("skipping", genome, routing=skipping_patch(betas) if top_k > 1 else None,
                        info={**info, "betas": betas, "beta_scale": beta_scale,
                              "calibration_share_skipped_per_rank": skipped,
                              "rule": "skip rank r>=2 when w_r < beta_r * w_1; kept weights rescaled to the top-k' sum",
                              "semantics": "runtime routing patch on top of the genome; plain transformers ignores it"})
