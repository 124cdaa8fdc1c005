"""One calibration pass: per MoE layer the block's inputs/outputs, router logits, probabilities and top-k choices."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from eep.arch import MoEAdapter, MoELayer
from eep.arch.base import call_experts
from eep.materialize import Materializer

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Calibration statistics of one MoE layer over the ``T`` real (non-padding) calibration tokens.

    ``inputs``, ``outputs: float[T, H]`` (the block's, shared experts included); ``logits: float[T, E]`` of every
    router row; ``probs: float[T, E]`` the family's routing rule at ``k = E`` (softmax for Mixtral/Qwen/OLMoE/Granite,
    DeepSeek's scaled sigmoid scores); ``weights: [T, k]``, ``indices: long[T, k]`` the choices as the model routed.
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor

    def frequency(self) -> torch.Tensor:
        """``float[E]``: how often each expert is among the chosen top-k."""
        return torch.bincount(self.indices.reshape(-1), minlength=self.logits.shape[1]).float()

    def soft_activation(self) -> torch.Tensor:
        """``float[E]``: summed routing probability ``sum_t p_t``."""
        return self.probs.sum(0)


def router_buffers(materializer: Materializer, layer: MoELayer, kept: torch.Tensor | None = None) -> dict:
    """The family's per-expert router tensors that ``route`` reads (DeepSeek's bias), optionally restricted to
    ``kept`` experts."""
    return materializer.adapter.route_buffers(layer.router, kept)


def route_subset(materializer: Materializer, layer: MoELayer, x: torch.Tensor, kept: torch.Tensor,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's router over the ``kept`` experts only (dropped ones masked, eep's rule): ``x: [T, H]`` ->
    ``(weights [T, k'], slots long[T, k'])`` with slots in the original numbering."""
    adapter = materializer.adapter
    logits = adapter.logits(layer.router, x, layer.router.weight[kept], kept)
    weights, idx = adapter.route(layer.router, logits, top_k, router_buffers(materializer, layer, kept))
    return weights, kept[idx]


def probabilities(materializer: Materializer, layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    """``float[T, E]``: the family's own routing rule at ``k = E`` (every expert's routing weight)."""
    weights, idx = materializer.adapter.route(layer.router, logits, logits.shape[1],
                                              router_buffers(materializer, layer))
    return torch.zeros_like(logits, dtype=torch.float).scatter(1, idx, weights.float())


@torch.no_grad()
def collect(materializer: Materializer, calibration: dict) -> list[LayerStats]:
    """Run the model once on ``calibration`` as it is now (original or patched) and gather :class:`LayerStats`."""
    from eep.methods.registry import MethodError

    if not materializer.adapter.block_input_routes:
        raise MethodError(f"{materializer.adapter.name()}'s router and experts do not read the MoE block's input, "
                          f"which calibration statistics are taken from: use a method without statistics (random)")
    keep = calibration["attention_mask"].reshape(-1).bool()
    parts: dict[int, dict[str, torch.Tensor]] = {layer.index: {} for layer in materializer.layers}
    handles = []
    for layer in materializer.layers:
        def block_hook(module, args, kwargs, output, i=layer.index):
            hidden = args[0] if args else next(iter(kwargs.values()))
            parts[i]["inputs"] = hidden.reshape(-1, hidden.shape[-1])[keep].float()
            out = output[0] if isinstance(output, tuple) else output
            parts[i]["outputs"] = out.reshape(-1, out.shape[-1])[keep].float()

        def router_hook(module, args, output, i=layer.index):
            parts[i]["weights"], parts[i]["indices"] = output[1][keep], output[2][keep]
        handles += [layer.block.register_forward_hook(block_hook, with_kwargs=True),
                    layer.router.register_forward_hook(router_hook)]
    try:
        materializer.model(input_ids=calibration["input_ids"], attention_mask=calibration["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [_layer_stats(materializer, layer, parts[layer.index]) for layer in materializer.layers]


def _layer_stats(materializer: Materializer, layer: MoELayer, part: dict) -> LayerStats:
    x = part["inputs"].to(layer.router.weight.dtype)
    logits = materializer.adapter.logits(layer.router, x, layer.router.weight).float()
    return LayerStats(part["inputs"], part["outputs"], logits, probabilities(materializer, layer, logits),
                      part["weights"].float(), part["indices"])


def expert_outputs(layer: MoELayer, x: torch.Tensor, expert: int, adapter: MoEAdapter | None = None) -> torch.Tensor:
    """``f_e(x): [T, H]`` for ``x: [T, H]``, computed by the model's own experts module with weight 1 (through
    ``adapter.expert_outputs`` when given: the family's activation, biases and layout)."""
    if adapter is None:
        return call_experts(layer.experts, x, expert)
    return adapter.expert_outputs(layer, x, expert)


def mean_expert_outputs(layer: MoELayer, x: torch.Tensor, num_experts: int,
                        adapter: MoEAdapter | None = None) -> torch.Tensor:
    """``float[E, H]``: every expert's mean output over all tokens ``x: [T, H]`` (HC-SMoE's features)."""
    x = x.to(adapter.expert_dtype if adapter is not None else x.dtype)
    return torch.stack([expert_outputs(layer, x, e, adapter).float().mean(0) for e in range(num_experts)])
