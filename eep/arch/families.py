"""The MoE families of transformers 5: which routing rule each one uses, where its parts live, or why eep refuses it.

One class per routing rule and layout; a family that copies one is a model type in that class's ``model_types``.
``eep.arch.survey.MOE_MODEL_TYPES`` lists every MoE model type of the tested transformers; each is registered here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eep.arch.base import MoEAdapter
from eep.arch.registry import refuse, register
from eep.arch.rules import (BiasedSoftmaxAdapter, FloatLogitsMixin, GroupLimitedSoftmaxAdapter, SigmoidAdapter,
                            SparseMixerAdapter, TopKSoftmaxAdapter)

# ---------------------------------------------------------------------- softmax over E, top-k, renormalise or not


@register
class MixtralAdapter(MoEAdapter):
    """``MixtralSparseMoeBlock`` (and MiniMax's, between lightning-attention layers): softmax over E, top-k, always
    renormalised; weights stay float32."""

    model_types = ("mixtral", "minimax")
    num_experts_key = "num_local_experts"
    always_renormalize = True
    weights_in_logit_dtype = False


@register
class QwenMoeAdapter(MoEAdapter):
    """Softmax, top-k, ``norm_topk_prob`` flag, weights in the logits' dtype; a shared expert and its gate (Qwen2,
    Qwen3-Next) are untouched; dense layers (``mlp_only_layers``, ``mlp_layer_types``) and other layer kinds
    (Qwen3-Next's linear attention) are skipped: only blocks with a router and experts are MoE layers."""

    model_types = ("qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "mellum", "qwen3_next", "qwen4_exp",
                   "qwen4_exp_text")


@register
class Qwen35MoeAdapter(MoEAdapter):
    """Qwen3.5-MoE: softmax, top-k, always renormalised, weights in the logits' dtype (hybrid linear attention)."""

    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    always_renormalize = True


@register
class LaraMiniAdapter(FloatLogitsMixin, MoEAdapter):
    """Lara-Mini: float32 logits, softmax, top-k, ``norm_topk_prob`` flag (hybrid linear attention)."""

    model_types = ("lara_mini",)


@register
class HunYuanMoeAdapter(FloatLogitsMixin, MoEAdapter):
    """HunYuan-MoE-V1: gate rows at ``gate.wg``, float32 logits, softmax, top-k (``moe_topk``), always renormalised;
    the shared MLP is untouched."""

    model_types = ("hunyuan_v1_moe",)
    router_weight = "wg.weight"
    top_k_key = "moe_topk"
    always_renormalize = True


@register
class JambaAdapter(MoEAdapter):
    """Jamba: MoE blocks at ``feed_forward`` of every ``expert_layer_period``-th layer (Mamba and attention layers
    both); softmax, top-k, no renormalisation."""

    model_types = ("jamba",)
    block_attr = "feed_forward"
    router_attr = "router"


# ---------------------------------------------------------------------- top-k of the logits, softmax over k


@register
class GraniteMoeAdapter(TopKSoftmaxAdapter):
    """``GraniteMoeMoE`` at ``block_sparse_moe`` (plain, sliding-window, Mamba hybrid, shared-expert variants):
    top-k of the float logits, then a softmax over those k; the shared MLP is untouched."""

    model_types = ("granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")
    block_attr = "block_sparse_moe"
    router_attr = "router"
    num_experts_key = "num_local_experts"
    float_logits = True


@register
class GptOssAdapter(TopKSoftmaxAdapter):
    """GPT-OSS: router with a per-expert bias, top-k of the logits, softmax over k; experts transposed
    (``gate_up_proj [E, H, 2I]`` interleaved gate/up, ``down_proj [E, I, H]``) with per-expert biases and a clamped
    SwiGLU: sliced and merged along the expert axis, expert outputs from the family's own experts module."""

    model_types = ("gpt_oss",)
    router_attr = "router"
    num_experts_key = "num_local_experts"
    router_bias = True
    weights_in_router_dtype = False
    router_tensors = {"bias": 0}
    expert_tensors = {"gate_up_proj": 0, "gate_up_proj_bias": 0, "down_proj": 0, "down_proj_bias": 0}
    standard_experts = False


@register
class AriaTextAdapter(TopKSoftmaxAdapter):
    """Aria's text model: top-k of the logits, softmax over k; transposed experts (``gate_up_proj [E, H, 2I]``);
    the shared experts are untouched."""

    model_types = ("aria_text",)
    router_attr = "router"
    num_experts_key = "moe_num_experts"
    top_k_key = "moe_topk"
    weights_in_router_dtype = False
    standard_experts = False


@register
class Cohere2MoeAdapter(TopKSoftmaxAdapter):
    """Cohere2-MoE: top-k of the logits, then a float32 softmax over k (``expert_selection_fn="softmax"``) or a
    sigmoid of them, renormalised by ``norm_topk_prob`` (``"sigmoid"``)."""

    model_types = ("cohere2_moe",)

    def route(self, router, logits, top_k, buffers):
        top_logits, indices = torch.topk(logits, top_k, dim=-1)
        if self.config.expert_selection_fn == "softmax":
            weights = F.softmax(top_logits, dim=1, dtype=torch.float)
        else:
            weights = F.sigmoid(top_logits)
            if self.config.norm_topk_prob:
                weights = weights / torch.sum(weights, dim=-1, keepdim=True)
        return weights.type_as(router.weight), indices

    @property
    def supports_merging(self) -> bool:
        return self.config.expert_selection_fn == "softmax"


# ---------------------------------------------------------------------- sigmoid scores, correction bias, groups


@register
class DeepseekV3Adapter(SigmoidAdapter):
    """DeepSeek-V3 routing (and its copies): sigmoid scores, ``e_score_correction_bias`` for the choice, grouped
    top-k (``n_group``, ``topk_group``), ``norm_topk_prob``, ``routed_scaling_factor``; shared experts and the dense
    first layers (``first_k_dense_replace``, ``mlp_layer_types``) untouched."""

    model_types = ("deepseek_v3", "sarvam_mla", "deepseek_v32", "glm4_moe", "sarvam_moe", "glm4_moe_lite",
                   "glm_moe_dsa", "axk1", "bailing_hybrid", "dots1", "kimi_linear", "mimo_v2_flash", "hy_v4",
                   "solar_open", "dots3_note", "dots3_note_text")
    num_experts_key = "num_local_experts"


@register
class ExaoneMoeAdapter(DeepseekV3Adapter):
    """EXAONE-MoE: DeepSeek-V3 routing, expert count at ``num_experts``."""

    model_types = ("exaone_moe",)
    num_experts_key = "num_experts"


@register
class BeamAdapter(DeepseekV3Adapter):
    """Beam: DeepSeek-V3 routing with the ``routed_scaling_factor`` applied by the block, after the experts."""

    model_types = ("beam",)
    num_experts_key = "num_experts"
    scale_key = None


@register
class Axk2Adapter(DeepseekV3Adapter):
    """AXK2: DeepSeek-V3 routing, experts outside the chosen groups scored 0 (not -inf); no groups when
    ``n_group`` is None."""

    model_types = ("axk2",)
    group_fill = 0.0

    @property
    def grouped(self) -> bool:
        return self.config.n_group is not None


@register
class NemotronHAdapter(DeepseekV3Adapter):
    """Nemotron-H: DeepSeek-V3 routing in the ``mixer`` of its ``moe`` layers (between Mamba and attention layers);
    non-gated experts (``up_proj [E, I, H]``, ``down_proj [E, H, I]``)."""

    model_types = ("nemotron_h",)
    block_attr = "mixer"
    expert_tensors = {"up_proj": 0, "down_proj": 0}
    standard_experts = False


@register
class SigmoidTopKAdapter(SigmoidAdapter):
    """Sigmoid scores plus correction bias, no groups, always renormalised, ``routed_scaling_factor`` (Inkling2,
    MiniMax-M3-VL's text model without scaling); ``scoring_func`` must be sigmoid."""

    model_types = ("inkling2_text", "inkling2_loop_text")
    num_experts_key = "num_local_experts"
    grouped = False
    always_renormalize = True

    def __init__(self, model):
        super().__init__(model)
        func = getattr(self.config, "scoring_func", "sigmoid")
        if func != "sigmoid":
            raise ValueError(f"{self.name()}: scoring_func={func!r} is not sigmoid, which this adapter reproduces")


@register
class MiniMaxM3Adapter(SigmoidTopKAdapter):
    """MiniMax-M3-VL's text model: sigmoid plus correction bias, top-k, renormalised, no scaling."""

    model_types = ("minimax_m3_vl_text",)
    scale_key = None
    renorm_eps = 0.0


@register
class MiniMaxM2Adapter(SigmoidAdapter):
    """MiniMax-M2: sigmoid scores plus the block's correction bias, which the block passes to its router; top-k,
    renormalised without epsilon, no scaling."""

    model_types = ("minimax_m2",)
    num_experts_key = "num_local_experts"
    router_args = ("e_score_correction_bias",)
    bias = "e_score_correction_bias"
    grouped = False
    always_renormalize = True
    scale_key = None
    renorm_eps = 0.0


@register
class HYV3Adapter(MiniMaxM2Adapter):
    """HY-V3: as MiniMax-M2, renormalised with epsilon 1e-20 and scaled by ``router_scaling_factor``; dense layers by
    ``mlp_layer_types``, the shared experts untouched."""

    model_types = ("hy_v3",)
    renorm_eps = 1e-20
    scale_key = "router_scaling_factor"


@register
class AfmoeAdapter(MiniMaxM2Adapter):
    """AFMoE: the router module ``router`` holds the gate ``gate [E, H]``; the block's ``expert_bias`` is the
    correction bias; renormalised (epsilon 1e-20), scaled by ``route_scale``; shared experts untouched."""

    model_types = ("afmoe",)
    num_experts_key = "num_experts"
    router_attr = "router"
    router_weight = "gate.weight"
    router_args = ("expert_bias",)
    bias = "expert_bias"
    renorm_eps = 1e-20
    scale_key = "route_scale"


@register
class Lfm2MoeAdapter(MiniMaxM2Adapter):
    """LFM2-MoE (``feed_forward`` blocks after dense first layers): sigmoid, the block's ``expert_bias`` where
    ``use_expert_bias``, renormalised by ``norm_topk_prob`` (epsilon 1e-6), scaled by ``routed_scaling_factor``."""

    model_types = ("lfm2_moe",)
    block_attr = "feed_forward"
    num_experts_key = "num_experts"
    router_args = ("expert_bias",)
    bias = "expert_bias"
    always_renormalize = False
    renorm_eps = 1e-6
    scale_key = "routed_scaling_factor"


@register
class LagunaAdapter(SigmoidAdapter):
    """Laguna: optional tanh soft cap of the float logits, sigmoid plus correction bias (a router parameter),
    top-k, renormalised, weights in the gate's dtype."""

    model_types = ("laguna",)
    grouped = False
    always_renormalize = True
    scale_key = None
    renorm_eps = 0.0
    softcap_key = "moe_router_logit_softcapping"
    weights_in_router_dtype = True


@register
class FlintAdapter(SigmoidAdapter):
    """Flint: top-k of the sigmoid of the float logits (no bias), ``norm_topk_prob``; dense ``mlp_only_layers``."""

    model_types = ("flint",)
    bias = None
    grouped = False
    scale_key = None
    renorm_eps = 0.0


@register
class Kolibri1Adapter(SigmoidAdapter):
    """Kolibri-1: the choice is the top-k of the float logits plus the correction bias (before any sigmoid); weights
    the sigmoid of the chosen logits, ``norm_topk_prob``."""

    model_types = ("kolibri1",)
    num_experts_key = "num_local_experts"
    grouped = False
    scale_key = None

    def route(self, router, logits, top_k, buffers, keep=None):
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        indices = torch.topk(logits + buffers[self.bias], top_k, dim=-1)[1]
        weights = logits.gather(1, indices).sigmoid()
        if self.renormalizes():
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices


# ---------------------------------------------------------------------- other softmax rules


@register
class DeepseekV2Adapter(GroupLimitedSoftmaxAdapter):
    """DeepSeek-V2: float32 softmax, greedy or group-limited greedy top-k, ``routed_scaling_factor``, no
    renormalisation; shared experts and dense first layers untouched."""

    model_types = ("deepseek_v2",)


@register
class Ernie45MoeAdapter(BiasedSoftmaxAdapter):
    """ERNIE-4.5-MoE: softmax with a correction bias for the choice (``moe_statics``), clamped renormalisation;
    the shared experts are untouched."""

    model_types = ("ernie4_5_moe",)
    top_k_key = "moe_k"
    num_experts_key = "moe_num_experts"


@register
class PhimoeAdapter(SparseMixerAdapter):
    """Phi-3.5-MoE: sparsemixer top-2 routing."""

    model_types = ("phimoe",)
    router_attr = "router"
    num_experts_key = "num_local_experts"


@register
class Gemma4TextAdapter(MoEAdapter):
    """Gemma-4's text model: the decoder layer itself holds ``router`` and ``experts`` next to its dense MLP; the
    router normalises its input (RMS norm without scale, times ``scale`` and ``H**-0.5``), gate rows at
    ``proj.weight``, softmax, top-k (``top_k_experts``), renormalised, times ``per_expert_scale`` of the chosen
    experts (sliced on export). The experts read a separately normalised input, so calibration statistics (taken
    at the block) are refused; merging too (eep's rule has no per-expert output scale)."""

    model_types = ("gemma4_text",)
    block_attr = ""
    router_attr = "router"
    router_weight = "proj.weight"
    router_buffers = ("per_expert_scale",)
    top_k_key = "top_k_experts"
    always_renormalize = True
    supports_merging = False
    block_input_routes = False

    def logits(self, router, hidden, weight, kept=None):
        hidden = router.norm(hidden.reshape(-1, weight.shape[1])) * router.scale * router.scalar_root_size
        return F.linear(hidden, weight)

    def route(self, router, logits, top_k, buffers):
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, k=top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * buffers["per_expert_scale"][indices], indices


# ---------------------------------------------------------------------- refused, with the reason

refuse("experts run densely: every expert runs on every token with its input scaled by sigmoid(top-k logits) "
       "(0 elsewhere), and the router returns (scores [T, E], logits), not the top-k weights and indices",
       "llama4", "llama4_text")
refuse("the router returns logits only and the block routes; the experts are 2-D [E*I, H] tensors in a GLU "
       "module", "dbrx")
refuse("mixture of attention heads (MoA) in every attention layer besides the MLP experts, with their own "
       "routers", "jetmoe")
refuse("zero-compute experts share the router with the real ones (identity outputs for the last "
       "zero_expert_num slots)", "longcat_flash")
refuse("an MLP router fed with the previous layer's router states and an extra skip expert", "zaya")
refuse("the router also routes the shared experts (E + shared rows, four outputs)", "inkling_text")
refuse("hash-routed layers choose experts by token id (tid2eid) and the learned router's top-k is elsewhere",
       "deepseek_v4")
refuse("cross-domain MoE: experts are rows of embedding tables retrieved by product keys, no expert modules "
       "behind a top-k router", "doge")
refuse("the multimodal model: load its text model (Gemma4ForCausalLM, model type gemma4_text)", "gemma4")
