"""The adapter contract: where a family keeps its MoE blocks, router and experts, and how its router routes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from eep.genome import Genome, GenomeError


@dataclass
class MoELayer:
    """One sparse MoE block of a loaded model: ``index`` among MoE layers, ``decoder_index`` among all layers."""

    index: int
    decoder_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


class MoEAdapter:
    """Softmax top-k routing (Mixtral, Qwen-MoE, OLMoE); subclasses declare locations and override what differs.

    Class attributes say where things live; ``route`` reproduces the family's router on given logits exactly, so that
    routing over a kept subset (``route_masked``: the dropped logits at -inf) is the physically pruned model's router.
    """

    model_types: tuple[str, ...] = ()
    block_attr: str = "mlp"                  # decoder layer -> sparse MoE block
    router_attr: str = "gate"                # block -> router module (.weight [E, H], .top_k, .num_experts)
    experts_attr: str = "experts"            # block -> fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I])
    num_experts_key: str = "num_experts"     # config key of E
    top_k_key: str = "num_experts_per_tok"   # config key of k
    always_renormalize: bool = False         # Mixtral renormalises the top-k weights unconditionally
    weights_in_logit_dtype: bool = True      # cast top-k weights back to the logits' dtype (Qwen, OLMoE)
    supports_merging: bool = True
    supports_top_k_change: bool = True
    router_buffers: tuple[str, ...] = ()     # per-expert router tensors besides .weight (sliced on export)

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.layers = self._find_layers()
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no sparse MoE layer at `{self.block_attr}.{self.router_attr}`")

    # ------------------------------------------------------------------ locations
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def _find_layers(self) -> list[MoELayer]:
        found = []
        for i, layer in enumerate(self.decoder_layers()):
            block = getattr(layer, self.block_attr, None)
            if block is not None and hasattr(block, self.experts_attr) and hasattr(block, self.router_attr):
                found.append(MoELayer(len(found), i, block, getattr(block, self.router_attr),
                                      getattr(block, self.experts_attr)))
        return found

    @cached_property
    def num_experts(self) -> int:
        """``E``, read from the config once."""
        return int(getattr(self.config, self.num_experts_key))

    @cached_property
    def top_k(self) -> int:
        """``k``, read from the config once."""
        return int(getattr(self.config, self.top_k_key))

    @cached_property
    def expert_groups(self) -> int:
        """Contiguous expert groups the router chooses among before the experts (1: none); a pruned layer keeps
        the same number of experts in each (DeepSeek-V3's ``n_group``)."""
        return 1

    def renormalizes(self) -> bool:
        return self.always_renormalize or bool(getattr(self.config, "norm_topk_prob", False))

    # ------------------------------------------------------------------ routing
    def logits(self, router: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``float[T, E*]``: router logits of ``hidden: [T, H]`` for the rows ``weight: [E*, H]``."""
        return F.linear(hidden.reshape(-1, weight.shape[1]), weight)

    def route(self, router: nn.Module, logits: torch.Tensor, top_k: int, buffers: dict) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """The family's own rule on ``logits: [T, E*]`` -> ``(weights: [T, k], indices: long[T, k])``."""
        probs = F.softmax(logits, dtype=torch.float, dim=-1)
        return self._top_k(probs, top_k, logits.dtype)

    def route_masked(self, router: nn.Module, logits: torch.Tensor, keep: torch.Tensor, top_k: int,
                     buffers: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's rule over the kept experts only (``keep: bool[E]``; dropped logits set to ``-inf``), as the
        physically pruned model routes: ``(weights: [T, k], indices: long[T, k])``, indices the original slots."""
        return self.route(router, logits.masked_fill(~keep, float("-inf")), top_k, buffers)

    def _top_k(self, probs: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = torch.topk(probs, top_k, dim=-1)
        if self.renormalizes():
            values /= values.sum(dim=-1, keepdim=True)
        return (values.to(dtype) if self.weights_in_logit_dtype else values), indices

    def route_mapped(self, router: nn.Module, logits: torch.Tensor, router_map: torch.Tensor, used: torch.Tensor,
                     top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """eep's rule for a continuous ``W_RM: [E', E]``: mask unused experts, ``p' = W_RM p``, top-k', renormalise.

        Returns ``(log p': [T, E'], weights: [T, k'], indices: long[T, k'])`` (indices into the E' new experts).
        """
        masked = logits.masked_fill(~used, float("-inf"))
        probs = F.softmax(masked, dtype=torch.float, dim=-1)
        mapped = probs @ router_map.to(probs.device, probs.dtype).T
        weights, indices = self._top_k(mapped, top_k, logits.dtype)
        return mapped.clamp_min(1e-30).log(), weights, indices

    # ------------------------------------------------------------------ constraints
    def validate(self, genome: Genome) -> None:
        """Raise :class:`GenomeError` where ``genome`` does not fit this model."""
        genome.validate_for(len(self.layers), self.num_experts)
        if not genome.is_pruning and not self.supports_merging:
            raise GenomeError(f"{self.name()} routing defines no expert merging: use a pruning genome")
        if genome.top_k != self.top_k and not self.supports_top_k_change:
            raise GenomeError(f"{self.name()} routing is hard-wired to top-{self.top_k}; top_k'={genome.top_k} "
                              f"is not available (use case 2 unsupported)")

    @classmethod
    def name(cls) -> str:
        return cls.__name__.removesuffix("Adapter")

    # ------------------------------------------------------------------ export
    def export_config(self, config, num_kept: int, top_k: int) -> None:
        """Set the expert count and top-k of a (copied) config for a model with ``num_kept`` experts per layer."""
        setattr(config, self.num_experts_key, num_kept)
        setattr(config, self.top_k_key, top_k)
