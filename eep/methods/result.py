"""What a method returns (genome, optional expert rewrite and routing patch, info) and how it is applied/exported."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eep.export import ExportResult, export
from eep.genome import Genome
from eep.materialize import Materializer, RoutingPatch

log = logging.getLogger(__name__)


@dataclass
class ExpertRewrite:
    """New weights for some expert slots of the original model, written before the genome is materialised.

    ``slots``: ``{(layer, expert): (gate_up [2I, H], down [H, I])}``. ``function_preserving``: each rewritten expert
    computes what the original did (permutation alignment) or not (SVD reconstruction). ``kind`` names it.
    """

    kind: str
    slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    function_preserving: bool
    saved: dict = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def apply(self, materializer: Materializer) -> None:
        """Write the new weights (the model must be restored); the originals are kept for :meth:`undo`."""
        if self.saved:
            raise RuntimeError(f"{self.kind} is already applied: undo() it first")
        layers = materializer.layers
        for (layer, expert), new in self.slots.items():
            params = _gate_up_down(materializer, layers[layer])
            self.saved[layer, expert] = tuple(p.data[expert].clone() for p in params)
            for p, w in zip(params, new):
                p.data[expert].copy_(w)
        materializer.forget_bank()

    @torch.no_grad()
    def undo(self, materializer: Materializer) -> None:
        """Write the original weights back, bit-exactly (the model must be restored)."""
        layers = materializer.layers
        for (layer, expert), old in self.saved.items():
            for p, w in zip(_gate_up_down(materializer, layers[layer]), old):
                p.data[expert].copy_(w)
        self.saved.clear()
        materializer.forget_bank()


def _gate_up_down(materializer: Materializer, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A standard-layout layer's live ``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` (rewrites need it)."""
    if not materializer.adapter.standard_experts:
        raise ValueError(f"expert rewrites need experts laid out as gate_up_proj [E, 2I, H] and down_proj "
                         f"[E, H, I]; {materializer.adapter.name()} experts are not")
    params = materializer.adapter.expert_params(layer)
    return params["gate_up_proj"], params["down_proj"]


@dataclass
class MethodResult:
    """A method's output: ``genome`` (same materialise / export path as the search), an optional ``rewrite`` of
    expert weights applied before it, an optional ``routing`` patch (``{layer: weights [T, k'] -> [T, k']}``, dynamic
    skipping) and JSON-able ``info`` (routing semantics, betas, ranks, bytes, seeds, fallback used, ...)."""

    method: str
    genome: Genome
    rewrite: ExpertRewrite | None = None
    routing: dict[int, RoutingPatch] | None = None
    info: dict = field(default_factory=dict)
    save_routing: Callable[[Path], Path] | None = None   # writes the routing patch into an export folder


@contextmanager
def applied(materializer: Materializer, result: MethodResult):
    """The model computes ``result`` inside (rewrite, genome, routing patch); afterwards it is bit-exactly what it
    was before (the previously applied genome and routing patch, if any, are applied again)."""
    with materializer.preserved():
        if result.rewrite is not None:
            result.rewrite.apply(materializer)
        try:
            materializer.apply(result.genome)
            materializer.patch_routing(result.routing)
            yield materializer.model
        finally:
            materializer.restore()
            if result.rewrite is not None:
                result.rewrite.undo(materializer)


def export_result(materializer: Materializer, result: MethodResult, folder: str | Path, tokenizer=None, *,
                  calibration: dict | None = None, provenance: dict | None = None, rescore=None) -> ExportResult:
    """Export ``result`` through :func:`eep.export.export` (rewrite applied), with ``result.info`` in the provenance.

    A routing patch (skipping) cannot live in a vanilla checkpoint: the export routes plain top-k', and the card and
    ``eep_export.json`` say so and record the patch's parameters (``info``).
    """
    provenance = {**(provenance or {}), "method": result.method, "method_info": result.info}
    notes = []
    if result.routing:
        notes.append("dynamic skipping is a runtime routing patch: plain transformers ignores it, so this checkpoint "
                     "loaded alone routes plain top-k'; eep.methods.skipping.load_skipping(model, folder) applies "
                     "the betas saved in skipping.json" if result.save_routing else
                     "a runtime routing patch that this checkpoint does not carry: it routes plain top-k'")
    if result.rewrite is not None:
        notes.append(f"expert weights rewritten by {result.rewrite.kind} before merging")
    provenance["method_notes"] = notes
    with applied(materializer, result):
        out = export(materializer.model, result.genome, folder, tokenizer, materializer=materializer,
                     calibration=calibration, provenance=provenance, rescore=rescore)
    if result.routing and result.save_routing is not None:
        result.save_routing(Path(folder))
    card = Path(folder) / "README.md"
    lines = ["", f"## Method: {result.method}", ""] + [f"- {n}" for n in notes]
    lines.append(f"- info: `{json.dumps(result.info, default=str)[:2000]}`")
    card.write_text(card.read_text() + "\n".join(lines) + "\n")
    out.notes.extend(notes)
    return out
