"""The supported MoE families of transformers 5: declarations, and overrides where routing really differs."""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from eep.arch.base import MoEAdapter
from eep.arch.registry import register
from eep.genome import Genome, GenomeError


@register
class MixtralAdapter(MoEAdapter):
    """``MixtralSparseMoeBlock``: softmax over E, top-k, always renormalised; weights stay float32."""

    model_types = ("mixtral",)
    num_experts_key = "num_local_experts"
    always_renormalize = True
    weights_in_logit_dtype = False


@register
class Qwen2MoeAdapter(MoEAdapter):
    """``Qwen2MoeSparseMoeBlock``: softmax, ``norm_topk_prob`` flag; the shared expert and its gate are untouched."""

    model_types = ("qwen2_moe",)


@register
class Qwen3MoeAdapter(MoEAdapter):
    """``Qwen3MoeSparseMoeBlock``: softmax, ``norm_topk_prob`` flag; dense layers by ``mlp_only_layers``."""

    model_types = ("qwen3_moe",)


@register
class OlmoeAdapter(MoEAdapter):
    """``OlmoeSparseMoeBlock``: softmax, ``norm_topk_prob`` flag (False in the released models)."""

    model_types = ("olmoe",)


@register
class GraniteMoeAdapter(MoEAdapter):
    """``GraniteMoeMoE`` at ``block_sparse_moe``: top-k of the float logits, then a softmax over those k."""

    model_types = ("granitemoe",)
    block_attr = "block_sparse_moe"
    router_attr = "router"
    experts_attr = "experts"
    num_experts_key = "num_local_experts"
    always_renormalize = True

    def logits(self, router, hidden, weight):
        return F.linear(hidden.reshape(-1, weight.shape[1]), weight).float()

    def route(self, router, logits, top_k, buffers):
        top_logits, indices = logits.topk(top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1).type_as(router.weight), indices


@register
class DeepseekV3Adapter(MoEAdapter):
    """``DeepseekV3MoE``: sigmoid scores, ``e_score_correction_bias``, grouped top-k, ``routed_scaling_factor``.

    Grouped routing over contiguous blocks of ``E / n_group`` experts: a pruned layer must keep the same number in
    every group (at least 2, since a group scores by its top 2) and ``k' <= topk_group * E' / n_group``. The paper
    defines no merging for such routers, so merging genomes are refused.
    """

    model_types = ("deepseek_v3",)
    num_experts_key = "n_routed_experts"
    supports_merging = False
    router_buffers = ("e_score_correction_bias",)

    @cached_property
    def expert_groups(self) -> int:
        return int(getattr(self.config, "n_group", 1) or 1)

    def logits(self, router, hidden, weight):
        return F.linear(hidden.reshape(-1, weight.shape[1]).float(), weight.float())

    def route(self, router, logits, top_k, buffers, keep=None):
        n_group, n = router.num_group, logits.shape[-1]
        scores = logits.sigmoid()
        choice = scores + buffers["e_score_correction_bias"]
        if keep is not None:  # sigmoid(-inf) + bias could still win: drop the experts from the choice itself
            choice = choice.masked_fill(~keep, float("-inf"))
        group_scores = choice.view(-1, n_group, n // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n // n_group).reshape(-1, n)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        indices = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if router.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
        return weights * router.routed_scaling_factor, indices

    def route_masked(self, router, logits, keep, top_k, buffers):
        return self.route(router, logits, top_k, buffers, keep)

    def validate(self, genome: Genome) -> None:
        super().validate(genome)
        n_group = self.expert_groups
        per_group = self.num_experts // n_group
        kept_per_group = genome.num_kept // n_group
        for layer in range(genome.num_layers):
            counts = torch.bincount(torch.tensor(genome.kept(layer)) // per_group, minlength=n_group).tolist()
            if len(set(counts)) != 1 or counts[0] < 2:
                raise GenomeError(f"DeepSeek-V3 layer {layer} keeps {counts} experts per expert group: every one of "
                                  f"the {n_group} groups must keep the same number, at least 2")
        if genome.top_k > self.config.topk_group * kept_per_group:
            raise GenomeError(f"top_k'={genome.top_k} exceeds topk_group * E'/n_group = "
                              f"{self.config.topk_group} * {kept_per_group}")
