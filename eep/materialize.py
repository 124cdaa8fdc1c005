"""Turn a genome into the live model, in place, and back: ``apply(genome)`` / ``restore()``.

One routing rule for every genome (docs/methods.md section 1.2): experts that no row of ``W_RM`` uses are masked out of
routing, ``p' = W_RM p`` over the rest, then the family's own top-k' and renormalisation. Two ways to compute it:

- a *pruning* layer (one-hot rows, ``W_RM = W_EM``, kept experts ``K``) runs the family's own router with the
  dropped experts' logits at ``-inf`` (``keep: bool[E]``, read at forward time from one ``bool[L, E]`` tensor): the
  physically pruned model's router, choosing among the original slots ``K``, and no expert weight is copied; an
  apply of a pruning genome after another writes that one tensor and nothing else;
- a *merging* layer writes ``W_EM @ W`` (for ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``) into slots
  ``0..E'-1`` of the fused expert tensors (originals kept in a bank: at most one copy of the expert tensors, on
  ``bank_device``) and routes with ``p' = W_RM softmax(mask(z))``; with ``genome.gate_rows``, by the family's own
  rule on ``z' = (W_RM @ W_gate) x`` (:func:`gate_rows_tensors`: the router its export holds).

``restore()`` undoes both bit-exactly. Consecutive merging candidates re-merge only the layers whose ``W_EM``
changed.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eep.arch import MoEAdapter, MoELayer, adapter_for
from eep.arch.base import lookup
from eep.genome import Genome

log = logging.getLogger(__name__)


@dataclass
class _Route:
    """What a patched merging router needs: the mapping and the slots of the new experts."""

    top_k: int
    slots: torch.Tensor                      # long[E']: expert slot of new expert j
    router_map: torch.Tensor                 # W_RM [E', E]
    used: torch.Tensor                       # bool[E], experts some row of W_RM uses


MASKED = "masked"   # ``installed`` value of a layer whose router is the masked (pruning) one


# ``(weights [T, k'], slots long[T, k']) -> (weights, slots)`` after the family's rule (e.g. dynamic skipping); a
# patch may send a (token, slot) pair to the sentinel slot ``E`` with weight 0: the experts then do not compute that
# pair (see ``Materializer.patch_routing``)
RoutingPatch = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _patched(fn: RoutingPatch | None, weights: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (weights, slots) if fn is None else fn(weights, slots)


def _compacting_forward(experts: nn.Module, sentinel: int):
    """A replacement for ``experts.forward(hidden [T, H], slots long[T, k], weights [T, k])`` that drops the pairs
    routed to ``sentinel`` before the experts run: the kept pairs ``P`` go through the module's own forward as
    ``P`` one-expert tokens (``[P, H]``, ``[P, 1]``, ``[P, 1]``) and are summed back per token (``index_add``), so a
    skipped pair costs no expert compute on any experts kernel (eager, ``grouped_mm``, ``batched_mm``)."""
    forward = type(experts).forward

    def compacted(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args,
                  **kwargs):
        kept = top_k_index < sentinel
        if bool(kept.all()):
            return forward(experts, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        token, rank = kept.nonzero(as_tuple=True)
        out = forward(experts, hidden_states[token], top_k_index[token, rank, None],
                      top_k_weights[token, rank, None], *args, **kwargs)
        return torch.zeros_like(hidden_states).index_add_(0, token, out.to(hidden_states.dtype))

    return compacted


def _merged_forward(adapter: MoEAdapter, router: nn.Module, route: _Route, patch: Callable[[], RoutingPatch | None]):
    """A replacement for ``router.forward`` returning ``(log p' [T, E'], weights [T, k'], slots [T, k'])``.

    ``patch()`` returns the layer's current routing patch (or None), applied to the weights after the family's rule.
    """

    def forward(hidden_states: torch.Tensor, *block_args):   # block_args: the adapter's ``router_args``
        full = adapter.logits(router, hidden_states, router.weight)
        logits, weights, idx = adapter.route_mapped(router, full, route.router_map, route.used, route.top_k)
        return (logits, *_patched(patch(), weights, route.slots[idx]))

    return forward


class _MappedRouter:
    """A router seen through its gate-rows mapping: the mapped per-expert tensors (``weight [E', H]``, a router
    bias ``[E']``) in place of its own, every other attribute (``top_k``, config values) read from the router."""

    def __init__(self, router: nn.Module, tensors: dict[str, torch.Tensor]):
        self.__dict__.update(tensors, _router=router)

    def __getattr__(self, name):
        return getattr(self.__dict__["_router"], name)


def _gate_rows_forward(adapter: MoEAdapter, router: nn.Module, mapped: dict[str, torch.Tensor], top_k: int,
                       patch: Callable[[], RoutingPatch | None]):
    """A replacement for ``router.forward`` routing by the family's own rule over the ``E'`` new experts with the
    mapped router (``mapped``: :func:`gate_rows_tensors`): ``(logits z' [T, E'], weights [T, k'], slots [T, k'])``,
    slots ``0..E'-1`` (where the merged experts are), exactly what the exported router computes."""
    tensors = {name: t for name, t in mapped.items() if "." not in name}
    stand_in = _MappedRouter(router, {**tensors, "weight": mapped[adapter.router_weight]})
    buffers = {b: mapped[b] for b in adapter.router_buffers}

    def forward(hidden_states: torch.Tensor, *block_args):
        logits = adapter.logits(stand_in, hidden_states, stand_in.weight)
        return (logits, *_patched(patch(), *adapter.route(stand_in, logits, top_k, buffers)))

    return forward


def gate_rows_tensors(adapter: MoEAdapter, router: nn.Module, router_map: torch.Tensor,
                      merge: torch.Tensor) -> dict[str, torch.Tensor]:
    """The router tensors of a gate-rows merging layer (dotted path -> ``[E', ...]``, the router's dtype): the
    terms of its logits (``adapter.logit_tensors``: the gate rows ``W_RM @ W_gate``, a router bias ``W_RM @ b``,
    so that ``z' = W_RM z``) mapped by ``W_RM: float[E', E]``, every other per-expert tensor by ``W_EM``. The
    in-place router and the export read the same tensors, so the exported router is the candidate's."""
    out = {}
    for name, axis in adapter.all_router_tensors().items():
        tensor = lookup(router, name).data
        mapping = router_map if name in adapter.logit_tensors else merge
        out[name] = merge_experts(mapping, tensor.movedim(axis, 0)).movedim(0, axis).contiguous()
    return out


def _masked_forward(adapter: MoEAdapter, router: nn.Module, state: Materializer, index: int):
    """A replacement for ``router.forward`` routing over the experts ``state.keeps[device][index]`` (this layer's
    row of the ``bool[L, E]`` mask on the router's device) at top-``state.keep_top_k`` (both read at call time):
    ``(logits [T, E], weights [T, k'], slots [T, k'])``, dropped logits at ``-inf``."""
    names, device = adapter.router_buffers, router.weight.device

    def forward(hidden_states: torch.Tensor, *block_args):
        logits = adapter.logits(router, hidden_states, router.weight)
        buffers = {b: getattr(router, b) for b in names} | dict(zip(adapter.router_args, block_args))
        keep = state.keeps[device][index]
        weights, idx = adapter.route_masked(router, logits, keep, state.keep_top_k, buffers)
        return (logits.masked_fill(~keep, float("-inf")), *_patched(state.route_patches.get(index), weights, idx))

    return forward


class Materializer:
    """Patches one loaded model in place so that its forward computes a genome's candidate."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter | None = None, bank_device: str | None = None):
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.bank_device = bank_device
        self.bank: dict[int, dict[str, torch.Tensor]] = {}              # layer -> original expert tensors
        self.merged: dict[int, torch.Tensor] = {}                      # layer -> W_EM written into its slots
        self.genome: Genome | None = None
        self.remerged_layers = 0                                       # layers re-merged by the last apply
        self.installed: dict[int, str | None] = {}                     # layer -> MASKED, or None (merged route)
        self.route_patches: dict[int, RoutingPatch] = {}               # layer -> routing patch (cleared by restore)
        self.keeps = {d: torch.ones(len(self.layers), self.adapter.num_experts, dtype=torch.bool, device=d)
                      for d in dict.fromkeys(layer.router.weight.device for layer in self.layers)}
        self.keep = next(iter(self.keeps.values()))   # bool[L, E]: experts each pruning layer routes (one per device)
        self.keep_top_k = self.adapter.top_k
        self._masked_everywhere = False                                # every layer has the masked router

    @property
    def layers(self) -> list[MoELayer]:
        return self.adapter.layers

    def apply(self, genome: Genome) -> None:
        """Make the model compute ``genome`` (validated against the model and its architecture first). A pruning
        genome after a pruning genome only rewrites ``keep``."""
        self.adapter.validate(genome)
        self.remerged_layers = 0
        if not (genome.is_pruning and self._masked_everywhere):
            self._install_layers(genome)
        self._set_keep(genome)
        self.genome = genome

    @torch.no_grad()
    def _install_layers(self, genome: Genome) -> None:
        """Pruning layers get the masked router (once), merging layers their merged slots and mapped router."""
        for layer in self.layers:
            if genome.kept(layer.index) is not None:
                self._unmerge(layer)
                if self.installed.get(layer.index) != MASKED:
                    self._install(layer, _masked_forward(self.adapter, layer.router, self, layer.index), MASKED)
            else:
                self._apply_merging_layer(layer, genome)
        self._masked_everywhere = all(self.installed.get(i.index) == MASKED for i in self.layers)

    def _set_keep(self, genome: Genome) -> None:
        """``keep[l]``: the experts layer ``l`` routes to (read by the masked routers; merging layers ignore it), on
        every device that holds a router (a model split over devices)."""
        for keep in self.keeps.values():
            keep.copy_(genome.layer_masks)
        self.keep_top_k = genome.top_k

    def _apply_merging_layer(self, layer: MoELayer, genome: Genome) -> None:
        router_map, merge = genome.layer(layer.index)
        self._merge(layer, merge)
        patch = lambda i=layer.index: self.route_patches.get(i)   # noqa: E731
        if genome.gate_rows:
            mapped = gate_rows_tensors(self.adapter, layer.router, router_map, merge)
            self._install(layer, _gate_rows_forward(self.adapter, layer.router, mapped, genome.top_k, patch), None)
            return
        device = layer.router.weight.device
        route = _Route(genome.top_k, torch.arange(genome.num_kept, device=device), router_map.to(device),
                       genome.used_experts(layer.index).to(device))
        self._install(layer, _merged_forward(self.adapter, layer.router, route, patch), None)

    def _install(self, layer: MoELayer, forward, kind: str | None) -> None:
        layer.router.forward = forward
        self.installed[layer.index] = kind

    def patch_routing(self, patches: dict[int, RoutingPatch] | None) -> None:
        """Post-process the routing of MoE layers (``{layer: (weights, slots) -> (weights, slots)}``) on top of the
        applied genome, e.g. dynamic skipping; ``None`` removes them. ``restore()`` removes them too.

        A patch may route a (token, slot) pair to the sentinel slot ``E`` (weight 0): the experts of a patched layer
        then run on the other pairs only (:func:`_compacting_forward`), whatever transformers' experts kernel.
        """
        if patches and self.genome is None:
            raise RuntimeError("apply a genome before patching routing (Genome.identity for the full model)")
        self.route_patches = dict(patches or {})
        for layer in self.layers:
            if layer.index in self.route_patches:
                layer.experts.forward = _compacting_forward(layer.experts, self.adapter.num_experts)
            else:
                layer.experts.__dict__.pop("forward", None)

    def forget_bank(self) -> None:
        """Drop the banked original experts: call after changing expert weights in place while restored (no merged
        layer), so that the next merge banks the weights as they are now."""
        if self.merged:
            raise RuntimeError(f"layers {sorted(self.merged)} are merged: restore() before changing expert weights")
        self.bank.clear()

    @contextmanager
    def preserved(self):
        """Context manager, the one way eep saves and restores what the model computes: the original model inside
        (whatever genome and routing patch were applied), and afterwards that genome and patch again."""
        previous, patches = self.genome, self.route_patches
        self.restore()
        try:
            yield self.model
        finally:
            self.restore()
            if previous is not None:
                self.apply(previous)
                self.patch_routing(patches)

    @contextmanager
    def applied(self, genome: Genome):
        """Context manager: the model computes ``genome`` inside, and what it computed before afterwards."""
        with self.preserved():
            self.apply(genome)
            yield self.model

    @torch.no_grad()
    def restore(self) -> None:
        """Return the model bit-exactly to its original weights and routing."""
        for layer in self.layers:
            self._unmerge(layer)
            layer.router.__dict__.pop("forward", None)
            layer.experts.__dict__.pop("forward", None)
        self.installed.clear()
        self._masked_everywhere = False
        self.route_patches = {}
        self.genome = None

    # ------------------------------------------------------------------ expert slots
    def original_expert_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        """The original per-expert tensors of a layer's experts module, by the adapter's declared names (expert axis
        first for every built-in family): the bank if the layer is merged, else the live tensors."""
        if layer.index in self.merged:
            return self.bank[layer.index]
        return {name: param.data for name, param in self.adapter.expert_params(layer).items()}

    def original_experts(self, layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The original ``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` of a layer (the bank if it is merged);
        only for families with the standard expert layout (``adapter.standard_experts``)."""
        if not self.adapter.standard_experts:
            raise ValueError(f"{self.adapter.name()} experts are not laid out as gate_up_proj [E, 2I, H] and "
                             f"down_proj [E, H, I]: use original_expert_tensors")
        tensors = self.original_expert_tensors(layer)
        return tensors["gate_up_proj"], tensors["down_proj"]

    def _banked(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        if layer.index not in self.bank:
            params = self.adapter.expert_params(layer)
            device = self.bank_device or next(iter(params.values())).device
            self.bank[layer.index] = {name: p.data.to(device, copy=True) for name, p in params.items()}
        return self.bank[layer.index]

    def _merge(self, layer: MoELayer, merge: torch.Tensor) -> None:
        current = self.merged.get(layer.index)
        if current is not None and torch.equal(current, merge):
            return
        originals = self._banked(layer)
        for name, param in self.adapter.expert_params(layer).items():
            merge_experts(merge, originals[name], out=param.data[: merge.shape[0]])
        self.merged[layer.index] = merge.clone()
        self.remerged_layers += 1

    def _unmerge(self, layer: MoELayer) -> None:
        merge = self.merged.pop(layer.index, None)
        if merge is None:
            return
        for name, param in self.adapter.expert_params(layer).items():
            param.data[: merge.shape[0]].copy_(self.bank[layer.index][name][: merge.shape[0]])


def merge_experts(merge: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W_EM @ W``: ``merge: float[E', E]``, ``weights: [E, ...]`` (experts first: ``[E, A, B]`` weights, ``[E, A]``
    biases) -> ``[E', ...]`` (computed in float32), written into ``out`` if given (float32 weights: one matrix
    product straight into it, no temporary)."""
    merge = merge.to(weights.device, torch.float32)
    if out is not None and weights.dtype == torch.float32 and out.is_contiguous() and weights.is_contiguous():
        torch.mm(merge, weights.view(weights.shape[0], -1), out=out.view(merge.shape[0], -1))
        return out
    merged = (merge @ weights.float().reshape(weights.shape[0], -1)).reshape(merge.shape[0], *weights.shape[1:])
    merged = merged.to(weights.dtype)
    return merged if out is None else out.copy_(merged)
