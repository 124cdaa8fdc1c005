"""After the search: pick the final candidate on validation, score full / in place / exported on test, report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from eep.files import write_atomic
from eep.genome import Genome
from eep.search.proposers import Archive

log = logging.getLogger(__name__)


def pick_final(archive: Archive, materializer, validator, n: int) -> tuple[Genome, dict]:
    """The best of the top-``n`` (search fitness) by validation fitness (ties: search fitness, then order)."""
    top = sorted(archive.scored(), key=lambda item: -item[0])[:max(1, n)]
    scored = []
    for rank, (search_fitness, genome) in enumerate(top):
        materializer.apply(genome)
        score = validator.evaluate()
        scored.append((score.fitness, search_fitness, -rank, genome, score))
        log.info("validation of candidate %s: %.4f (search %.4f)", genome.content_hash(), score.fitness,
                 search_fitness)
    materializer.restore()
    best = max(scored, key=lambda item: item[:3])
    table = [{"genome_hash": g.content_hash(), "search": sf, "validation": vf} for vf, sf, _, g, _ in scored]
    return best[3], {"candidates": table, "metrics": best[4].metrics, "fitness": best[0]}


def _document_text(evaluator, inst) -> str:
    """A request's context with its continuation (loglikelihood) or its reference answer (generation)."""
    if inst.request_type == "loglikelihood":
        return inst.args[0] + inst.args[1]
    task = evaluator.tasks[inst.task_name]
    target = task.doc_to_target(inst.doc)
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(inst.doc)[target]
    return inst.args[0] + (target[0] if isinstance(target, list) else str(target))


def calibration_tokens(evaluator, tokenizer, n: int = 64, padding_side: str = "right",
                       prompts_only: bool = False) -> dict:
    """``{"input_ids", "attention_mask"}`` of the first ``n`` documents the evaluator scores, with their answers
    (so that refit gates see the positions where answers are generated); ``prompts_only`` and left padding for
    generation."""
    insts = [inst for reqs in evaluator.requests.values() for inst in reqs][:n]
    texts = [inst.args[0] if prompts_only else _document_text(evaluator, inst) for inst in insts]
    side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    device = next(evaluator.model.parameters()).device
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def parameter_counts(model, adapter, num_kept: int | None = None) -> dict[str, int]:
    """Total and routed-expert parameters, as loaded or with ``num_kept`` experts per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel() for layer in adapter.layers)
    if num_kept is None:
        return {"total": total, "expert": expert}
    kept = expert * num_kept // adapter.num_experts
    router = sum(layer.router.weight.numel() for layer in adapter.layers) * (adapter.num_experts - num_kept) \
        // adapter.num_experts
    return {"total": total - expert + kept - router, "expert": kept}


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (eep only writes image files: no display, no GUI toolkit probed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(rows: list[dict], path: Path) -> None:
    """Search fitness against distinct evaluations, one colour per phase, with the running best."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    best, xs, ys = float("-inf"), [], []
    for i, row in enumerate(rows, 1):
        best = max(best, row["fitness"])
        xs.append(i)
        ys.append(best)
    for phase, colour in (("prune", "tab:blue"), ("merge", "tab:orange")):
        pts = [(i, r["fitness"]) for i, r in enumerate(rows, 1) if r["phase"] == phase]
        if pts:
            ax.scatter(*zip(*pts), s=10, color=colour, label=f"{phase} candidates")
    ax.plot(xs, ys, color="black", label="best so far")
    ax.set_xlabel("distinct evaluations")
    ax.set_ylabel("search fitness")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, report: dict) -> None:
    write_atomic(run_dir / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    t = report["test"]
    lines = [f"# eep-search report: {report['task']}", "",
             f"Model `{report['model']}`, {report['experts']['before']} -> {report['experts']['after']} experts per "
             f"MoE layer, top-{report['top_k']['before']} -> top-{report['top_k']['after']}.", "",
             "| | test | validation | experts | parameters |", "|---|---|---|---|---|",
             f"| full | {t['full']:.4f} | {report['validation']['full']:.4f} | {report['experts']['before']} | "
             f"{report['parameters']['before']['total']:,} |",
             f"| best (in place) | {t['best_in_place']:.4f} | {report['validation']['best_in_place']:.4f} | "
             f"{report['experts']['after']} | {report['parameters']['after']['total']:,} |",
             f"| best (exported) | {t['best_exported']:.4f} | | {report['experts']['after']} | |", "",
             f"- test split: {report['test_split']}, limit {report['test_limit']}",
             f"- distinct evaluations: {report['evaluations']}, search time {report['search_seconds']:.0f} s",
             f"- greedy generation: full {report['generation']['full']['tokens_per_second']:.0f} tokens/s, exported "
             f"{report['generation']['exported']['tokens_per_second']:.0f} tokens/s; weights "
             f"{report['generation']['full']['weight_bytes'] / 2**20:.1f} -> "
             f"{report['generation']['exported']['weight_bytes'] / 2**20:.1f} MiB",
             f"- best genome: `{report['best_hash']}` (exact export: {report['export']['exact']})"]
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def first_metric(score, task: str) -> float:
    """The task's first metric from a Score (the value lm-eval reports)."""
    return next(iter(score.metrics[task].values()))


def reported_value(score, names: list[str]) -> float:
    """What reports show for a Score: the task's first metric for a single task, else the weighted fitness."""
    return first_metric(score, names[0]) if len(names) == 1 else score.fitness


def expert_usage(model, adapter, batch: dict) -> torch.Tensor:
    """``float[L, E]``: share of top-k selections per expert slot per MoE layer over the batch's real tokens."""

    counts = torch.zeros(len(adapter.layers), adapter.num_experts)
    keep = batch["attention_mask"].reshape(-1).bool().cpu()
    handles = []
    for layer in adapter.layers:
        def hook(module, args, output, i=layer.index):
            chosen = output[2].reshape(keep.shape[0], -1)[keep].reshape(-1).cpu()
            counts[i] += torch.bincount(chosen, minlength=adapter.num_experts)[: adapter.num_experts].float()
        handles.append(layer.router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def plot_usage(before, after, path: Path) -> None:
    """Two heat maps, MoE layers x expert slots: routing shares of the full model and of the chosen candidate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, data, title in zip(axes, (before, after), ("full model", "chosen candidate")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"expert usage: {title}")
        ax.set_xlabel("expert slot")
        ax.set_yticks(range(data.shape[0]))
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of top-k selections")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def generation_speed(model, batch: dict, new_tokens: int = 16) -> dict:
    """Greedy generation throughput (new tokens per second) and memory: peak GPU bytes on CUDA, else weight bytes."""

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    # exactly `new_tokens` new tokens, as total lengths: max_new_tokens would conflict with a max_length in the
    # model's own generation config (transformers then warns that both are set)
    length = batch["input_ids"].shape[1] + new_tokens
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, max_length=length, min_length=length, do_sample=False,
                       pad_token_id=model.generation_config.pad_token_id or 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"tokens_per_second": batch["input_ids"].shape[0] * new_tokens / seconds}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out
