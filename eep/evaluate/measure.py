"""What a compressed model saves, measured: parameters, expert usage per layer, generation throughput and memory."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def parameter_counts(model, adapter, num_kept: int | None = None) -> dict[str, int]:
    """Total and routed-expert parameters (every per-expert tensor the adapter declares), as loaded or with
    ``num_kept`` experts per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for layer in adapter.layers for p in adapter.expert_params(layer).values())
    if num_kept is None:
        return {"total": total, "expert": expert}
    kept = expert * num_kept // adapter.num_experts
    router = sum(layer.router.weight.numel() for layer in adapter.layers) * (adapter.num_experts - num_kept) \
        // adapter.num_experts
    return {"total": total - expert + kept - router, "expert": kept}


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
    out["weight_bytes"] = parameter_bytes(model)
    return out


def checkpoint_bytes(folder) -> int | None:
    """Bytes of a saved checkpoint's weight files (``*.safetensors``, else ``*.bin``); None where ``folder`` is not a
    local folder holding any (a model loaded from the Hub cache by name)."""
    folder = Path(str(folder)) if folder else None
    if folder is None or not folder.is_dir():
        return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def parameter_bytes(model) -> int:
    """Bytes of the loaded parameters (``numel * element_size`` summed)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prefill_speed(model, batch: dict, repeats: int = 3) -> float:
    """Prefill throughput: real tokens of ``batch`` (``attention_mask`` summed) per second of one forward, the median
    of ``repeats`` after one warm-up forward."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        once()
        seconds = statistics.median(once() for _ in range(repeats))
    return float(batch["attention_mask"].sum()) / seconds
