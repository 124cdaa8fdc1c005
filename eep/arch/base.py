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
    router_buffers: tuple[str, ...] = ()     # router attributes passed to ``route`` as ``buffers`` (per expert)
    router_weight: str = "weight"            # router -> its ``[E, H]`` gate rows (aliased as ``router.weight``)
    # per-expert tensors of the router (dotted path inside the router -> expert axis), sliced on export
    router_tensors: dict[str, int] = {}
    # per-expert tensors of the block that it passes to its router after the hidden states (MiniMax-M2's
    # ``e_score_correction_bias``), by block attribute; given to ``route`` as ``buffers`` and sliced on export
    router_args: tuple[str, ...] = ()
    # per-expert tensors of the experts module (name -> expert axis); merged and sliced along that axis
    expert_tensors: dict[str, int] = {"gate_up_proj": 0, "down_proj": 0}
    # True: ``gate_up_proj [E, 2I, H]`` (gate rows then up rows), ``down_proj [E, H, I]``, ``act(gate) * up``, no
    # biases; the methods that edit expert weights (permutation alignment, SVD) need it
    standard_experts: bool = True
    # True: the block's input is what its router and experts read, so calibration statistics (taken at the block)
    # can recompute logits and expert outputs; False refuses the methods that need them
    block_input_routes: bool = True
    notes: str = ""                          # how the family is treated (docs/architectures.md)

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.layers = self._find_layers()
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no sparse MoE layer at `{self.block_attr}.{self.router_attr}`")
        self._check_structure()

    # ------------------------------------------------------------------ locations
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def _find_layers(self) -> list[MoELayer]:
        found = []
        for i, layer in enumerate(self.decoder_layers()):
            block = getattr(layer, self.block_attr, None) if self.block_attr else layer
            if block is not None and hasattr(block, self.experts_attr) and hasattr(block, self.router_attr):
                found.append(MoELayer(len(found), i, block, getattr(block, self.router_attr),
                                      getattr(block, self.experts_attr)))
        return found

    def _check_structure(self) -> None:
        """Alias the gate rows as ``router.weight`` and check every declared per-expert tensor has ``E`` entries
        along its expert axis; a ValueError names the first one that does not."""
        where = f"{type(self.model).__name__} ({self.name()} adapter)"
        for layer in self.layers:
            if self.router_weight != "weight":  # a plain attribute, not a registered parameter: no new state key
                object.__setattr__(layer.router, "weight", lookup(layer.router, self.router_weight))
            tensors = [("router", layer.router, name, axis) for name, axis in self.all_router_tensors().items()]
            tensors += [("experts", layer.experts, name, axis) for name, axis in self.expert_tensors.items()]
            tensors += [("block", layer.block, name, 0) for name in self.router_args
                        if lookup(layer.block, name) is not None]   # None: the family's config switches it off
            for kind, module, name, axis in tensors:
                tensor = lookup(module, name)
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"{where}: MoE layer {layer.decoder_index} has no {kind} tensor `{name}`")
                if tensor.dim() <= axis or tensor.shape[axis] != self.num_experts:
                    raise ValueError(f"{where}: {kind} tensor `{name}` of layer {layer.decoder_index} has shape "
                                     f"{tuple(tensor.shape)}, not {self.num_experts} experts on axis {axis} "
                                     f"(config `{self.num_experts_key}`)")

    @property
    def logit_tensors(self) -> tuple[str, ...]:
        """The router tensors that are terms of its logits ``z = W_gate x (+ b)``: what a gate-rows merging genome
        maps by ``W_RM`` (the gate rows; families with a router bias add it)."""
        return (self.router_weight,)

    def all_router_tensors(self) -> dict[str, int]:
        """Every per-expert router tensor (dotted path -> expert axis): the gate rows, ``router_buffers`` and
        ``router_tensors``."""
        return {self.router_weight: 0, **{b: 0 for b in self.router_buffers}, **self.router_tensors}

    def expert_params(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        """The live per-expert tensors of a layer's experts module, by declared name (expert axis first)."""
        return {name: lookup(layer.experts, name) for name in self.expert_tensors}

    def expert_outputs(self, layer: MoELayer, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``f_e(x): [T, H]`` for ``x: [T, H]``: the family's own experts module at routing weight 1 (its own
        activation, biases and layout)."""
        return call_experts(layer.experts, x, expert)

    @property
    def expert_dtype(self) -> torch.dtype:
        """The dtype of the expert weights (inputs are cast to it before calling the experts)."""
        return next(iter(self.expert_params(self.layers[0]).values())).dtype

    @cached_property
    def num_experts(self) -> int:
        """``E``, read from the config once."""
        return int(lookup(self.config, self.num_experts_key))

    @cached_property
    def top_k(self) -> int:
        """``k``, read from the config once."""
        return int(lookup(self.config, self.top_k_key))

    @cached_property
    def expert_groups(self) -> int:
        """Contiguous expert groups the router chooses among before the experts (1: none); a pruned layer keeps
        the same number of experts in each (DeepSeek-V3's ``n_group``)."""
        return 1

    def renormalizes(self) -> bool:
        return self.always_renormalize or bool(getattr(self.config, "norm_topk_prob", False))

    # ------------------------------------------------------------------ routing
    def logits(self, router: nn.Module, hidden: torch.Tensor, weight: torch.Tensor,
               kept: torch.Tensor | None = None) -> torch.Tensor:
        """``float[T, E*]``: router logits of ``hidden: [T, H]`` for the rows ``weight: [E*, H]`` (the experts
        ``kept: long[E*]`` of the router's, all of them when None)."""
        return F.linear(hidden.reshape(-1, weight.shape[1]), weight)

    def route_buffers(self, router: nn.Module, kept: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ``buffers`` that ``route`` reads (``router_buffers`` of the router, ``router_args`` of its block),
        restricted to ``kept: long[E*]`` if given."""
        out = {b: getattr(router, b) for b in self.router_buffers}
        if self.router_args:
            block = next(layer.block for layer in self.layers if layer.router is router)
            out.update({b: getattr(block, b, None) for b in self.router_args})
        return {b: t if kept is None or t is None else t[kept] for b, t in out.items()}

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
        assign(config, self.num_experts_key, num_kept)
        assign(config, self.top_k_key, top_k)


def call_experts(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """``f_e(x): [T, H]``: a fused experts module's own forward on ``x: [T, H]``, every token routed to ``expert``
    at weight 1."""
    idx = torch.full((x.shape[0], 1), expert, dtype=torch.long, device=x.device)
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return experts(x, idx, ones).reshape(x.shape)


def lookup(obj, path: str):
    """``obj.a.b`` for ``path = "a.b"`` (None where an attribute is missing): modules, configs."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def assign(obj, path: str, value) -> None:
    """Set ``obj.a.b = value`` for ``path = "a.b"``."""
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)
