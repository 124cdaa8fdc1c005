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
import json
import logging
from pathlib import Path

import torch
from torch import nn

from eep.genome import Genome
from eep.materialize import Materializer, RoutingPatch
from eep.methods.registry import METHODS, register
from eep.methods.result import MethodResult
from eep.methods.statistics import collect

log = logging.getLogger(__name__)


FILE = "skipping.json"


def skip_mask(weights: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """``bool[T, k']``: False where the slot's rank ``r >= 2`` has ``w_r < betas[r-2] * w_1`` (``weights: [T, k']``,
    any order; ``betas: float[k'-1]``); the top slot is always kept."""
    sorted_w, order = weights.sort(dim=-1, descending=True)
    thresholds = torch.cat([torch.zeros(1, device=betas.device), betas]).to(weights) * sorted_w[:, :1]
    keep_sorted = sorted_w >= thresholds
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def skip_weights(weights: torch.Tensor, betas: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``weights: [T, k']`` -> ``[T, k']`` with the skipped slots (:func:`skip_mask`) zeroed and the kept weights
    rescaled to the original sum: ``w'_i = w_i * sum_j w_j / sum_{j kept} w_j``."""
    keep = skip_mask(weights, betas) if keep is None else keep
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))


def skip_routing(weights: torch.Tensor, slots: torch.Tensor, betas: torch.Tensor,
                 sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing patch's rule: ``(weights [T, k'], slots long[T, k'])`` -> the skipped slots sent to ``sentinel``
    (the experts' count ``E``: not computed) with weight 0, the kept weights rescaled as in :func:`skip_weights`."""
    keep = skip_mask(weights, betas)
    return skip_weights(weights, betas, keep), slots.masked_fill(~keep, sentinel)


def skip_ratios(weights: torch.Tensor) -> torch.Tensor:
    """``float[T, k'-1]``: per token and rank ``r >= 2`` the ratio ``w_r / w_1`` (``weights: [T, k']``)."""
    sorted_w = weights.float().sort(dim=-1, descending=True).values
    return sorted_w[:, 1:] / sorted_w[:, :1].clamp_min(1e-30)


def skipping_patch(betas: list[list[float]], num_experts: int) -> dict[int, RoutingPatch]:
    """The routing patch ``{layer: (weights, slots) -> skipped}`` for per-layer betas (``betas[l]: k'-1 floats``) on
    experts modules of ``num_experts`` slots (the sentinel)."""
    return {i: functools.partial(skip_routing, betas=torch.tensor(b, dtype=torch.float32), sentinel=num_experts)
            for i, b in enumerate(betas)}


def save_skipping(folder: str | Path, betas: list[list[float]], top_k: int) -> Path:
    """Write ``folder/skipping.json`` (the betas per MoE layer and the rule) for :func:`load_skipping`."""
    path = Path(folder) / FILE
    path.write_text(json.dumps({"format": "eep-skipping/1", "top_k": top_k, "betas": betas,
                                "rule": "skip rank r>=2 when w_r < beta_r * w_1; kept weights rescaled to the "
                                        "top-k' sum"}, indent=1) + "\n")
    return path


def load_skipping(model: nn.Module, folder: str | Path) -> Materializer:
    """Make a model loaded with plain ``from_pretrained`` skip as its export's ``skipping.json`` says; returns the
    :class:`~eep.materialize.Materializer` holding the patch (``.restore()`` removes it).

    Raises ValueError where the file does not fit the model (layer count, top-k)."""
    spec = json.loads((Path(folder) / FILE).read_text())
    materializer = Materializer(model)
    adapter = materializer.adapter
    if len(spec["betas"]) != len(materializer.layers) or spec["top_k"] != adapter.top_k:
        raise ValueError(f"{Path(folder) / FILE} holds betas for {len(spec['betas'])} MoE layers at top-"
                         f"{spec['top_k']}; the model has {len(materializer.layers)} at top-{adapter.top_k}")
    materializer.apply(Genome.identity(len(materializer.layers), adapter.num_experts, adapter.top_k))
    materializer.patch_routing(skipping_patch(spec["betas"], adapter.num_experts))
    return materializer


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
    routing = skipping_patch(betas, num_experts) if top_k > 1 else None
    return MethodResult("skipping", genome, routing=routing,
                        save_routing=functools.partial(save_skipping, betas=betas, top_k=top_k) if routing else None,
                        info={**info, "betas": betas, "beta_scale": beta_scale,
                              "calibration_share_skipped_per_rank": skipped,
                              "rule": "skip rank r>=2 when w_r < beta_r * w_1; kept weights rescaled to the top-k' sum",
                              "semantics": "runtime routing patch on top of the genome: skipped pairs are "
                                           "removed before the experts run; skipping.json in an export, applied by "
                                           "eep.methods.skipping.load_skipping; plain transformers ignores it"})
