"""Apply time of pruning and merging candidates: eep's in-place materialiser vs reloading the state dict.

    python bench/materialize.py [--models skills-mixtral,skills-olmoe,random-mixtral-0.6b] [--candidates 20]

The reference method is what the released EEP code does per candidate: compute every layer's merged expert slots
from a CPU copy of the experts, then ``load_state_dict`` the whole model. Candidates follow one another as in a
search: each changes every layer with probability 0.25 (at least one layer). Medians per candidate; ratios come
from the same run. Add ``--device cuda`` on a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import eep.zoo
from eep.arch import adapter_for
from eep.genome import Genome
from eep.materialize import Materializer, merge_experts


def load(name: str, device: str):
    if name == "random-mixtral-0.6b":
        config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=8, num_local_experts=8,
                               num_experts_per_tok=2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(eep.zoo.path(name), dtype=torch.float32)
    return model.to(device).eval()


def candidate_chain(kind: str, layers: int, experts: int, kept: int, top_k: int, n: int, seed: int) -> list[Genome]:
    """``n`` genomes, each a mutation of the previous one in a random subset of layers (p = 0.25, at least one)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    subsets = [rng.sample(range(experts), kept) for _ in range(layers)]
    rm, em = torch.rand(layers, kept, experts, generator=gen), torch.rand(layers, kept, experts, generator=gen)
    chain = []
    for _ in range(n):
        changed = [l for l in range(layers) if rng.random() < 0.25] or [rng.randrange(layers)]
        for l in changed:
            if kind == "pruning":
                subsets[l] = rng.sample(range(experts), kept)
            else:
                rm[l] += 0.065 * torch.randn(kept, experts, generator=gen)
                em[l] += 0.065 * torch.randn(kept, experts, generator=gen)
                rm[l].clamp_(min=0)
        chain.append(Genome.pruning(subsets, experts, top_k) if kind == "pruning"
                     else Genome.merging(rm.clone(), em.clone(), top_k))
    return chain


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_eep(model, chain: list[Genome], device: str) -> list[float]:
    mat = Materializer(model)
    mat.apply(chain[0])  # warm-up (and the bank for merging)
    times = []
    for genome in chain[1:]:
        sync(device)
        start = time.perf_counter()
        mat.apply(genome)
        sync(device)
        times.append(time.perf_counter() - start)
    mat.restore()
    return times


@torch.no_grad()
def time_reference(model, chain: list[Genome], device: str) -> list[float]:
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    cpu_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    original = dict(cpu_state)
    times = []
    for genome in chain[1:]:
        sync(device)
        start = time.perf_counter()
        state = dict(cpu_state)
        for layer in adapter.layers:
            _, merge = genome.layer(layer.index)
            for param in ("gate_up_proj", "down_proj"):
                key = f"{names[id(layer.experts)]}.{param}"
                slots = original[key].clone()
                slots[: merge.shape[0]] = merge_experts(merge, original[key])
                state[key] = slots
        model.load_state_dict(state)
        sync(device)
        times.append(time.perf_counter() - start)
    model.load_state_dict(original)
    return times


def run(name: str, device: str, n: int) -> list[dict]:
    model = load(name, device)
    adapter = adapter_for(model)
    layers, experts = len(adapter.layers), adapter.num_experts
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for kind in ("pruning", "merging"):
        chain = candidate_chain(kind, layers, experts, experts // 2, min(adapter.top_k, experts // 2), n + 1, seed=0)
        ours = statistics.median(time_eep(model, chain, device))
        ref = statistics.median(time_reference(model, chain, device))
        rows.append({"model": name, "parameters": params, "kind": kind, "candidates": n, "eep_s": ours,
                     "reference_s": ref, "speedup": ref / ours})
        print(f"{name:<22} {kind:<8} eep {ours * 1e3:10.3f} ms  reference {ref * 1e3:10.1f} ms  "
              f"speed-up {ref / ours:10.1f}x", flush=True)
    del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="skills-mixtral,skills-olmoe,random-mixtral-0.6b")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    rows = [r for name in args.models.split(",") for r in run(name, args.device, args.candidates)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
