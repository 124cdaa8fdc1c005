"""Per-layer, per-expert statistics from one calibration pass, saved and reused at any E' or k'.

``expert_scores(materializer, calibration)`` computes, from a single forward over the calibration tokens, the scores
the statistic baselines keep experts by: ``frequency`` (top-k selections), ``soft_activation`` (summed routing
probability) and ``reap`` (router-weighted expert output norm), each ``float[L, E]``. ``save_scores`` writes them to a
safetensors file with where they came from (``statistics.safetensors`` in a run folder); ``load_scores`` reads one back
and refuses a file made on a model of another shape. ``genome_from_scores`` keeps, per layer group, the ``E'``
experts of highest score summed over the group's layers (per expert group on grouped routers), so a statistic seeds
a search with depth groups too. Formulas: docs/methods.md sections 5.2 to 5.4.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from eep.errors import UserError
from eep.files import write_atomic
from eep.genome import Genome
from eep.materialize import Materializer
from eep.methods.selection import keep_top, reap_saliency
from eep.methods.statistics import collect

STATISTICS = ("frequency", "soft_activation", "reap")   # the methods whose genome is a top-E' of a per-expert score


@torch.no_grad()
def expert_scores(materializer: Materializer, calibration: dict) -> dict[str, torch.Tensor]:
    """``{name: float[L, E]}`` for every name of :data:`STATISTICS`, from one pass over ``calibration`` on the
    original model (whatever genome was applied is re-applied afterwards)."""
    num_experts = materializer.adapter.num_experts
    with materializer.preserved():
        stats = collect(materializer, calibration)
        reap = torch.stack([reap_saliency(layer, s, num_experts, materializer.adapter) for layer, s in zip(materializer.layers, stats)])
    return {"frequency": torch.stack([s.frequency() for s in stats]),
            "soft_activation": torch.stack([s.soft_activation() for s in stats]), "reap": reap}


def save_scores(path: Path, scores: dict[str, torch.Tensor], info: dict) -> None:
    """Write ``scores`` to ``path`` (safetensors, atomically) with ``info`` (model, calibration, tokens) as metadata."""
    from safetensors.torch import save

    write_atomic(path, save({k: v.float().contiguous() for k, v in scores.items()},
                            metadata={"eep": json.dumps(info, default=str)}))


def load_scores(path, num_layers: int, num_experts: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The scores and metadata of a :func:`save_scores` file; a UserError naming ``statistics=`` if it is missing,
    unreadable or made on a model with another number of MoE layers or experts."""
    from safetensors import safe_open

    path = Path(str(path))
    if not path.is_file():
        raise UserError(f"statistics={path}: no such file; give a statistics.safetensors an eep-search run wrote")
    try:
        with safe_open(str(path), "pt") as fh:
            scores = {k: fh.get_tensor(k) for k in fh.keys()}
            info = json.loads((fh.metadata() or {}).get("eep", "{}"))
    except Exception as err:  # noqa: BLE001 - any reader error is the user's file
        raise UserError(f"statistics={path}: not a readable safetensors file ({err})") from None
    for name, value in scores.items():
        if tuple(value.shape) != (num_layers, num_experts):
            raise UserError(f"statistics={path}: {name} has shape {list(value.shape)} but this model has "
                            f"{num_layers} MoE layers of {num_experts} experts; give the file of a run on this model")
    return scores, info


def genome_from_scores(materializer: Materializer, scores: torch.Tensor, template: Genome) -> Genome:
    """The pruning genome keeping, per layer group of ``template``, the ``E'`` experts whose ``scores: float[L, E]``
    summed over the group's layers are highest (ties: lower index), with ``template``'s top-k' and groups."""
    grouped = torch.stack([scores[list(group)].double().sum(0) for group in template.groups])
    kept = [keep_top(materializer, row[None], template.num_kept)[0] for row in grouped]
    return Genome.pruning(kept, template.num_experts, template.top_k, template.groups)


def group_genome(materializer: Materializer, genome: Genome, template: Genome) -> Genome:
    """A per-layer pruning ``genome`` mapped to ``template``'s layer groups: each group keeps the ``E'`` experts
    kept most often across its layers (ties broken by the first layer's choice, then the lower index)."""
    if genome.groups == template.groups:
        return genome
    votes = torch.zeros(genome.num_layers, genome.num_experts, dtype=torch.float64)
    for layer in range(genome.num_layers):
        votes[layer, genome.kept(layer)] = 1.0 + 1e-3 * (genome.num_layers - layer) / genome.num_layers
    return genome_from_scores(materializer, votes, template)
