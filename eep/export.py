"""Write a candidate as a vanilla Hugging Face checkpoint with ``E'`` experts per layer (no custom code to load)."""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import eep
from eep.arch import MoEAdapter
from eep.arch.base import lookup
from eep.genome import Genome, GenomeError
from eep.materialize import Materializer, gate_rows_tensors, merge_experts

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """Where the checkpoint went and how faithful it is to the in-place candidate."""

    folder: str
    genome_hash: str
    exact: bool                       # True for pruning and gate-rows genomes: the checkpoint is the candidate
    num_experts: int
    top_k: int
    router_top_k_overlap: float | None = None   # merging: share of the candidate's top-k' choices the refit gate keeps
    in_place_score: float | None = None         # with ``rescore``: the candidate's score, patched in place
    exported_score: float | None = None         # with ``rescore``: the reloaded checkpoint's score
    notes: list[str] = field(default_factory=list)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def exported_state_dict(materializer: Materializer, genome: Genome,
                        routers: dict[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every MoE layer cut to ``E'`` experts.

    Pruning layers: every per-expert tensor the adapter declares (the router's rows, biases and correction
    biases; the experts module's weights and biases) sliced to the kept experts along its expert axis. Merging
    layers: ``W_EM @ W`` of every expert tensor from the original experts; router rows from ``routers[layer]`` (a
    refit gate) and the router's other per-expert tensors ``W_EM @ b``, or, for a gate-rows genome, the mapped
    router itself (:func:`eep.materialize.gate_rows_tensors`, exact).
    """
    adapter = materializer.adapter
    names = _param_names(materializer.model)
    state = dict(materializer.model.state_dict())
    for layer in adapter.layers:
        router, experts = names[id(layer.router)], names[id(layer.experts)]
        originals = materializer.original_expert_tensors(layer)
        kept = genome.kept(layer.index)
        merge = None if kept is not None else genome.layer(layer.index)[1]
        mapped = gate_rows_tensors(adapter, layer.router, *genome.layer(layer.index)) \
            if kept is None and genome.gate_rows else {}
        for name, axis in adapter.all_router_tensors().items():
            tensor = lookup(layer.router, name).data
            if name in mapped:
                state[f"{router}.{name}"] = mapped[name]
            elif kept is not None:
                state[f"{router}.{name}"] = tensor.index_select(axis, torch.tensor(kept, device=tensor.device))
            elif name == adapter.router_weight:
                state[f"{router}.{name}"] = routers[layer.index].to(tensor)
            else:
                state[f"{router}.{name}"] = merge_experts(merge, tensor.movedim(axis, 0)).movedim(0, axis).contiguous()
        for name in adapter.router_args:   # block tensors the router reads (pruning only: sigmoid routers)
            tensor = getattr(layer.block, name, None)
            if tensor is not None and kept is not None:
                block = names[id(layer.block)]
                state[f"{block}.{name}"] = tensor.index_select(0, torch.tensor(kept, device=tensor.device))
        for name, axis in adapter.expert_tensors.items():
            tensor = originals[name]
            if kept is not None:
                state[f"{experts}.{name}"] = tensor.index_select(axis, torch.tensor(kept, device=tensor.device))
            else:
                state[f"{experts}.{name}"] = merge_experts(merge, tensor.movedim(axis, 0)).movedim(0, axis).contiguous()
    return state


@torch.no_grad()
def refit_routers(materializer: Materializer, genome: Genome, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], float]:
    """Least-squares gates ``W'[E', H]`` with ``softmax(W' x) ~ p' = W_RM p`` on calibration tokens.

    Fits ``W' x ~ log p' - mean_j log p'`` (softmax ignores a per-token shift) for every merging layer and returns
    the gates (fit on all tokens) and the mean share of the candidate's top-k' choices that a gate fit on the first
    80% of the tokens reproduces on the last 20%.
    """
    adapter = materializer.adapter
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer in adapter.layers:
        if genome.kept(layer.index) is None:
            def hook(module, args, output, i=layer.index):
                captured.setdefault(i, []).append((args[0].reshape(-1, args[0].shape[-1]), output[0], output[2]))
            handles.append(layer.router.register_forward_hook(hook))
    try:
        with materializer.applied(genome):
            materializer.model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    keep = attention_mask.reshape(-1).bool() if attention_mask is not None else slice(None)
    routers, overlaps = {}, []
    for i, parts in captured.items():
        hidden = torch.cat([p[0] for p in parts])[keep].float()
        log_p = torch.cat([p[1] for p in parts])[keep].float()
        chosen = torch.cat([p[2] for p in parts])[keep]
        target = log_p - log_p.mean(dim=1, keepdim=True)
        fit = max(1, int(0.8 * len(hidden)))  # the last 20% of the tokens measure agreement out of sample
        held = slice(fit, None) if fit < len(hidden) else slice(None)
        weight = torch.linalg.lstsq(hidden[:fit], target[:fit]).solution.T          # [E', H]
        refit = (hidden[held] @ weight.T).topk(genome.top_k, dim=-1).indices
        overlaps.append(_overlap(refit, chosen[held]))
        routers[i] = torch.linalg.lstsq(hidden, target).solution.T
    return routers, float(sum(overlaps) / max(1, len(overlaps))) if overlaps else 1.0


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of ``b``'s chosen indices per token that ``a`` also chooses (both ``long[T, k]``)."""
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float()
    return hits.mean().item()


def export(model: nn.Module, genome: Genome, folder: str | Path, tokenizer=None, *,
           materializer: Materializer | None = None, calibration: dict | None = None,
           provenance: dict | None = None, rescore: Callable[[nn.Module], float] | None = None) -> ExportResult:
    """Write ``genome`` applied to ``model`` as a vanilla checkpoint in ``folder``; return how exact it is.

    Pruning genomes export exactly (sliced router rows and experts, ``config`` count and ``num_experts_per_tok``
    updated), and so do gate-rows merging genomes (their router is ``W_RM @ W_gate``). The continuous ``W_RM`` of a
    probability-mapping merging genome is no linear gate: its gates are refit by least squares on ``calibration``
    (``{"input_ids", "attention_mask"}``, required then) and the top-k' agreement is reported.
    ``provenance`` (base model, method, scores, ...) goes into the model card and ``eep_export.json``. With
    ``rescore`` (a model -> score function, e.g. an :class:`~eep.evaluate.evaluator.Evaluator` built on it), the
    in-place candidate and the reloaded checkpoint are both scored and recorded.
    """
    materializer = materializer or Materializer(model)
    adapter = materializer.adapter
    adapter.validate(genome)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"export folder {folder} is not empty: choose a new folder")
    result = ExportResult(str(folder), genome.content_hash(), genome.exports_exactly,
                          genome.num_kept, genome.top_k)
    routers = None
    if not result.exact:
        if calibration is None:
            raise GenomeError("exporting a merging genome needs calibration tokens to refit its gates: pass "
                              "calibration={'input_ids': ..., 'attention_mask': ...}")
        routers, result.router_top_k_overlap = refit_routers(materializer, genome, **calibration)
        result.notes.append("merging genome: gates refit by least squares (not exact); "
                            f"top-{genome.top_k} overlap with the in-place candidate {result.router_top_k_overlap:.3f}")
    result.notes.extend(serving_notes(genome.num_kept))
    state = exported_state_dict(materializer, genome, routers)
    _save(model, adapter, genome, state, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if rescore is not None:
        _rescore(model, materializer, genome, folder, rescore, result)
    _write_card(folder, model, genome, result, provenance or {})
    return result


EXPERT_PARALLEL_SIZES = (2, 4, 8)   # the expert-parallel sizes serving deployments commonly use


def serving_notes(num_kept: int) -> list[str]:
    """What a serving stack should know about ``E'`` experts per layer (each also logged as a warning): E' not
    divisible by a common expert-parallel size means unequal expert shards (or a refusal) at that size. That E' is
    divisible by the router's expert groups (DeepSeek-V3's ``n_group``) is checked before, by the adapter's
    ``validate``, which refuses other genomes."""
    uneven = [size for size in EXPERT_PARALLEL_SIZES if size <= num_kept and num_kept % size]
    if not uneven:
        return []
    note = (f"E'={num_kept} experts per layer is not divisible by expert-parallel size(s) "
            f"{', '.join(map(str, uneven))}: serving with expert parallelism at those sizes gives ranks unequal "
            f"expert counts or is refused; tensor parallelism and the other sizes are unaffected")
    log.warning(note)
    return [note]


def _rescore(model, materializer: Materializer, genome: Genome, folder: Path, rescore, result: ExportResult) -> None:
    """Score the in-place candidate and the reloaded checkpoint with the same function (model left as found)."""
    from transformers import AutoModelForCausalLM

    with materializer.applied(genome):
        result.in_place_score = float(rescore(model))
    device = next(model.parameters()).device
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).to(device).eval()
    result.exported_score = float(rescore(reloaded))
    del reloaded


def _save(model: nn.Module, adapter: MoEAdapter, genome: Genome, state: dict, folder: Path) -> None:
    config = copy.deepcopy(model.config)
    adapter.export_config(config, genome.num_kept, genome.top_k)
    with torch.device("meta"):
        out = type(model)(config)
    out.load_state_dict(state, assign=True, strict=True)
    out.generation_config = copy.deepcopy(model.generation_config)
    out.save_pretrained(folder)


def _write_card(folder: Path, model: nn.Module, genome: Genome, result: ExportResult, provenance: dict) -> None:
    base = provenance.get("base_model") or getattr(model.config, "_name_or_path", "") or "unknown"
    record = {"eep_version": eep.__version__, "base_model": str(base), "genome": genome.to_dict(),
              **asdict(result), **{k: v for k, v in provenance.items() if k != "base_model"}}
    (folder / "eep_export.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    lines = [f"# {Path(str(base)).name} with {genome.num_kept} of {genome.num_experts} experts per MoE layer", "",
             f"Exported by eep {eep.__version__}. Loads with plain `AutoModelForCausalLM.from_pretrained` "
             f"(no remote code).", "",
             f"- base model: `{base}`", f"- genome hash: `{result.genome_hash}` ({genome.kind})",
             f"- method: {provenance.get('method', 'unspecified')}",
             f"- experts per layer: {genome.num_experts} -> {genome.num_kept}; active per token: {genome.top_k}",
             f"- exact: {result.exact}" + (f" (router top-k overlap {result.router_top_k_overlap:.3f})"
                                          if result.router_top_k_overlap is not None else "")]
    if result.exported_score is not None:
        lines.append(f"- score in place {result.in_place_score:.4f}, of this checkpoint {result.exported_score:.4f}")
    for key, value in (provenance.get("scores") or {}).items():
        lines.append(f"- score {key}: {value}")
    lines += [f"- note: {n}" for n in result.notes]
    if genome.is_pruning:
        lines += ["", "Kept experts per MoE layer:", ""]
        lines += [f"- layer {i}: {genome.kept(i)}" for i in range(genome.num_layers)]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
