"""Routing rules shared by several families: one adapter class per rule, families declare where things live.

``MoEAdapter`` itself is softmax over E -> top-k -> optional renormalisation (Mixtral, Qwen, OLMoE, ...). Here:

- :class:`TopKSoftmaxAdapter`: top-k of the logits, softmax over those k (Granite, GPT-OSS, Aria, Cohere2-MoE);
- :class:`SigmoidAdapter`: sigmoid scores, optional correction bias for the choice, optional expert groups,
  optional renormalisation and scaling (DeepSeek-V3, GLM-4-MoE, dots1, MiniMax-M3, Flint, Laguna, ...);
- :class:`GroupLimitedSoftmaxAdapter`: DeepSeek-V2's softmax with greedy or group-limited greedy top-k;
- :class:`BiasedSoftmaxAdapter`: ERNIE-4.5's softmax with a correction bias for the choice;
- :class:`SparseMixerAdapter`: Phi-3.5-MoE's sparsemixer, called from the family's own modeling module.

Every ``route`` maps ``logits: [T, E*]`` to ``(weights: [T, k], indices: long[T, k])`` exactly as the family's router
module does; ``route_masked`` gives the physically pruned router (dropped experts can never be chosen).
"""
from __future__ import annotations

import sys
from functools import cached_property

import torch
import torch.nn.functional as F

from eep.arch.base import MoEAdapter
from eep.genome import Genome, GenomeError


class FloatLogitsMixin:
    """Router logits computed in float32 from float32 copies of the input and the gate rows."""

    def logits(self, router, hidden, weight, kept=None):
        return F.linear(hidden.reshape(-1, weight.shape[1]).float(), weight.float())


class TopKSoftmaxAdapter(MoEAdapter):
    """Top-k of the logits, then a softmax over those k (``softmax(topk(z))`` equals renormalised top-k softmax).

    ``float_logits``: logits in float32 (Granite); ``router_bias``: the router's per-expert ``bias`` is added to the
    logits (GPT-OSS); ``weights_in_router_dtype``: weights cast to the gate's dtype (Granite) or left in the
    logits' dtype (GPT-OSS, Aria).
    """

    always_renormalize = True
    float_logits: bool = False
    router_bias: bool = False
    weights_in_router_dtype: bool = True

    @property
    def logit_tensors(self) -> tuple[str, ...]:
        return (self.router_weight, "bias") if self.router_bias else (self.router_weight,)

    def logits(self, router, hidden, weight, kept=None):
        z = F.linear(hidden.reshape(-1, weight.shape[1]), weight)
        if self.router_bias:
            z = z + (router.bias if kept is None else router.bias[kept])
        return z.float() if self.float_logits else z

    def route(self, router, logits, top_k, buffers):
        top_logits, indices = logits.topk(top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        return (weights.type_as(router.weight) if self.weights_in_router_dtype else weights), indices


class SigmoidAdapter(MoEAdapter):
    """Sigmoid scores ``s = sigmoid(z)``; the choice is the top-k of ``s + b`` (``bias``: a router tensor's name,
    or None), within the best ``topk_group`` of ``n_group`` contiguous expert groups (a group scores by its top 2)
    when ``grouped``; weights ``s`` at the choice, renormalised (``norm_topk_prob`` or ``always_renormalize``) and
    scaled by ``config.<scale_key>`` (None: no scaling in the router).

    Grouped routing over contiguous blocks of ``E / n_group`` experts: a pruned layer must keep the same number in
    every group (at least 2) and ``k' <= topk_group * E' / n_group``. eep's merging rule is defined for softmax
    routers only, so merging genomes are refused.
    """

    supports_merging = False
    bias: str | None = "e_score_correction_bias"
    grouped: bool = True
    group_fill: float = float("-inf")         # score of the experts outside the chosen groups (AXK2: 0.0)
    scale_key: str | None = "routed_scaling_factor"
    renorm_eps: float = 1e-20
    softcap_key: str | None = None            # config key of a tanh soft cap on the logits (Laguna)
    weights_in_router_dtype: bool = False     # cast the weights to the gate's dtype (Laguna)

    @property
    def router_buffers(self) -> tuple[str, ...]:
        return (self.bias,) if self.bias and self.bias not in self.router_args else ()

    @cached_property
    def expert_groups(self) -> int:
        return int(getattr(self.config, "n_group", 1) or 1) if self.grouped else 1

    def logits(self, router, hidden, weight, kept=None):
        z = F.linear(hidden.reshape(-1, weight.shape[1]).float(), weight.float())
        cap = float(getattr(self.config, self.softcap_key, 0.0) or 0.0) if self.softcap_key else 0.0
        return torch.tanh(z / cap) * cap if cap > 0 else z

    def route(self, router, logits, top_k, buffers, keep=None):
        n = logits.shape[-1]
        scores = logits.sigmoid()
        bias = buffers.get(self.bias) if self.bias else None   # None: a block whose config switches it off
        choice = scores + bias.to(scores.dtype) if bias is not None else scores
        if keep is not None:  # sigmoid(-inf) + bias could still win: drop the experts from the choice itself
            choice = choice.masked_fill(~keep, float("-inf"))
        n_group = self.expert_groups
        if n_group > 1:
            group_scores = choice.view(-1, n_group, n // n_group).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=self.config.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n // n_group).reshape(-1, n)
            choice = choice.masked_fill(~score_mask.bool(), self.group_fill)
            if keep is not None and self.group_fill != float("-inf"):
                choice = choice.masked_fill(~keep, float("-inf"))
        indices = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if self.renormalizes():
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.renorm_eps)
        if self.scale_key:
            weights = weights * getattr(self.config, self.scale_key)
        return (weights.type_as(router.weight) if self.weights_in_router_dtype else weights), indices

    def route_masked(self, router, logits, keep, top_k, buffers):
        return self.route(router, logits, top_k, buffers, keep)

    def validate(self, genome: Genome) -> None:
        super().validate(genome)
        validate_groups(self, genome)


def validate_groups(adapter: MoEAdapter, genome: Genome) -> None:
    """Grouped routers: every group keeps the same number of experts (at least 2: a group scores by its top 2, or
    1 for DeepSeek-V2's max) and ``k' <= topk_group * E' / n_group``."""
    n_group = adapter.expert_groups
    if n_group <= 1:
        return
    per_group, kept_per_group = adapter.num_experts // n_group, genome.num_kept // n_group
    least = getattr(adapter, "least_per_group", 2)
    for layer in range(genome.num_layers):
        counts = torch.bincount(torch.tensor(genome.kept(layer)) // per_group, minlength=n_group).tolist()
        if len(set(counts)) != 1 or counts[0] < least:
            raise GenomeError(f"{adapter.name()} layer {layer} keeps {counts} experts per expert group: every one "
                              f"of the {n_group} groups must keep the same number, at least {least}")
    if genome.top_k > adapter.config.topk_group * kept_per_group:
        raise GenomeError(f"top_k'={genome.top_k} exceeds topk_group * E'/n_group = "
                          f"{adapter.config.topk_group} * {kept_per_group}")


class GroupLimitedSoftmaxAdapter(FloatLogitsMixin, MoEAdapter):
    """DeepSeek-V2: float32 softmax; ``topk_method`` ``greedy`` (plain top-k) or ``group_limited_greedy`` (top-k
    within the ``topk_group`` groups of highest max probability, others at 0); no renormalisation; weights scaled
    by ``routed_scaling_factor``."""

    supports_merging = False
    least_per_group = 1

    @cached_property
    def expert_groups(self) -> int:
        grouped = getattr(self.config, "topk_method", "greedy") == "group_limited_greedy"
        return int(self.config.n_group or 1) if grouped else 1

    def route(self, router, logits, top_k, buffers):
        n, n_group = logits.shape[-1], self.expert_groups
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if n_group > 1:
            group_scores = scores.view(-1, n_group, n // n_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.config.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n // n_group).reshape(-1, n)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, indices = torch.topk(scores, k=top_k, dim=-1, sorted=False)
        return weights * self.config.routed_scaling_factor, indices

    def validate(self, genome: Genome) -> None:
        super().validate(genome)
        validate_groups(self, genome)


class BiasedSoftmaxAdapter(FloatLogitsMixin, MoEAdapter):
    """ERNIE-4.5-MoE: float32 softmax ``p``; the choice is the top-k of ``p + b`` (``b``: the router's
    ``moe_statics.e_score_correction_bias [1, E]``); weights ``p`` at the choice over ``max(sum, moe_norm_min)``.
    Merging is refused (the bias has no meaning for merged experts)."""

    supports_merging = False
    router_tensors = {"moe_statics.e_score_correction_bias": 1}

    def route_buffers(self, router, kept=None):
        bias = router.moe_statics.e_score_correction_bias[0]
        return {"bias": bias if kept is None else bias[kept]}

    def route(self, router, logits, top_k, buffers, keep=None):
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        choice = probs + buffers.get("bias", router.moe_statics.e_score_correction_bias[0])
        if keep is not None:
            choice = choice.masked_fill(~keep, float("-inf"))
        indices = torch.topk(choice, top_k, dim=-1)[1]
        weights = torch.gather(probs, dim=-1, index=indices)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.config.moe_norm_min)
        return weights.type_as(router.weight), indices

    def route_masked(self, router, logits, keep, top_k, buffers):
        return self.route(router, logits.masked_fill(~keep, float("-inf")), top_k, buffers, keep)


class SparseMixerAdapter(MoEAdapter):
    """Phi-3.5-MoE: the family's own ``sparsemixer`` (eval mode) on the logits: top-2 with a jitter-threshold
    mask; hard-wired to top-2 and no merging (sparsemixer is no softmax top-k)."""

    supports_merging = False
    supports_top_k_change = False

    def route(self, router, logits, top_k, buffers):
        sparsemixer = sys.modules[type(router).__module__].sparsemixer
        return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=False, top_k=top_k)
