"""What pruning saves at inference: prefill and decode speed, peak memory and bytes of full and compressed exports.

    python bench/inference.py                                   # shipped models + the random Mixtral, on CPU
    python bench/inference.py --models random-mixtral --device cuda
    python bench/inference.py --models skills-mixtral --experts-implementations eager

For each model, four variants are exported into one temporary folder with eep's own export; each one's peak memory
is measured in a process of its own, and their speeds in one process that holds all four and times them in
interleaved rounds (a change of the machine's load then falls on every variant alike). The variants: ``full`` (the model as it is), ``pruned`` (half the experts
kept, by ``frequency`` on calibration tokens: 4 of 8 for Mixtral), ``top_k`` (all experts, ``k' = k/2``: 1 of 2)
and ``skipping`` (all experts, dynamic skipping at the betas calibrated on the same tokens, loaded from the export's
``skipping.json`` with :func:`eep.methods.skipping.load_skipping`), each under every experts kernel named (transformers'
``experts_implementation``: ``grouped_mm``, its default, and ``eager``). Per variant: prefill tokens per second (batch x
prompt tokens, one forward), batched greedy decode tokens per second (``generate`` with a fixed number of new
tokens), the time inside the sparse MoE blocks (forward hooks; its share of the forward), the share of (token,
expert) pairs skipped, peak memory (``VmHWM`` on CPU, ``max_memory_allocated`` on CUDA) and parameter bytes
(the checkpoint's safetensors files, and the loaded parameters); on CPU also the peak above the process's size after
its imports (``peak_above_imports_bytes``). Medians over ``--repeats`` rounds, ``--threads`` torch threads (default 1); ratios against
``full`` come from one run. Raw output: ``bench/results/inference*.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from record import load, write

VARIANTS = ("full", "pruned", "top_k", "skipping")
RANDOM = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
# prefill (batch, tokens) and decode (batch, prompt tokens, new tokens): the sizes where the model's context
# allows them (the shipped models hold 64 positions)
SHAPES = {"random-mixtral": ((16, 256), (16, 16, 128)), "shipped": ((16, 48), (16, 16, 32))}


def build(name: str):
    """``(model, tokenizer or None)`` in float32 on CPU: a shipped model, or the seeded random Mixtral."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    import eep.zoo

    if name == "random-mixtral":
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(MixtralConfig(**RANDOM), dtype=torch.float32).eval(), None
    folder = eep.zoo.path(name)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        folder)


def random_ids(vocab: int, batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, tokens), generator=generator)


def prepare(name: str, root: Path) -> dict[str, Path]:
    """Export the four variants of ``name`` under ``root`` (``{variant: folder}``)."""
    from eep.export import export
    from eep.genome import Genome
    from eep.materialize import Materializer
    from eep.methods import calibration_batch, compute, export_result

    model, tok = build(name)
    mat = Materializer(model)
    adapter = mat.adapter
    if tok is None:
        ids = random_ids(model.config.vocab_size, 16, 128, seed=1)
        cal = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        cal = calibration_batch(model, tok, n=64)
    layers, experts, top_k = len(mat.layers), adapter.num_experts, adapter.top_k
    folders = {v: root / name / v for v in VARIANTS}
    export(model, Genome.identity(layers, experts, top_k), folders["full"], tok, materializer=mat)
    pruned = compute("frequency", model, mat, cal, num_kept=experts // 2, top_k=top_k)
    export_result(mat, pruned, folders["pruned"], tok)
    export(model, Genome.identity(layers, experts, max(1, top_k // 2)), folders["top_k"], tok, materializer=mat)
    skipping = compute("skipping", model, mat, cal, num_kept=experts, top_k=top_k)
    export_result(mat, skipping, folders["skipping"], tok)
    return folders


class MoETimer:
    """Forward hooks on every sparse MoE block (time inside them) and on its experts (pairs routed and skipped)."""

    def __init__(self, adapter, device: str):
        self.seconds, self.pairs, self.skipped, self.device = 0.0, 0, 0, device
        self._start = 0.0
        for layer in adapter.layers:
            layer.block.register_forward_pre_hook(self._enter)
            layer.block.register_forward_hook(self._leave)
            layer.experts.register_forward_pre_hook(self._count, with_kwargs=True)

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _enter(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _leave(self, module, args, output):
        self._sync()
        self.seconds += time.perf_counter() - self._start

    def _count(self, module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        self.pairs += index.numel()
        self.skipped += int((index >= module.num_experts).sum())

    def reset(self):
        self.seconds, self.pairs, self.skipped = 0.0, 0, 0


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_rss() -> int:
    """This process's peak resident set (``VmHWM``: reset at exec, unlike ``ru_maxrss``, which a child started by a
    parent holding a large model inherits)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def load_variant(folder: Path, variant: str, device: str, implementation: str | None):
    """A variant as a user loads it: plain ``from_pretrained`` (and, for ``skipping``, ``load_skipping``)."""
    from transformers import AutoModelForCausalLM

    from eep.methods.skipping import load_skipping

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    if implementation:
        model.set_experts_implementation(implementation)
    if variant == "skipping":
        load_skipping(model, folder)
    return model


def workloads(model, shipped: bool, device: str):
    """``(prefill ids [B, S], decode prompt ids [B, P], new tokens)`` for the model's vocabulary."""
    (batch, tokens), (dec_batch, prompt, new) = SHAPES["shipped" if shipped else "random-mixtral"]
    vocab = model.config.vocab_size
    return (random_ids(vocab, batch, tokens).to(device), random_ids(vocab, dec_batch, prompt, seed=2).to(device), new)


def decode(model, prompt: torch.Tensor, new: int):
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=0)


def measure_memory(folder: Path, variant: str, shipped: bool, device: str, implementation: str | None) -> dict:
    """One variant alone in this process: peak memory over a load, one prefill and one decode; bytes."""
    baseline = peak_rss()   # after the imports, before the model
    model = load_variant(folder, variant, device, implementation)
    ids, prompt, new = workloads(model, shipped, device)
    with torch.no_grad():
        model(input_ids=ids)
        decode(model, prompt, new)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss()
    return {"variant": variant, "peak_memory_bytes": peak,
            "peak_above_imports_bytes": peak - (0 if device.startswith("cuda") else baseline),
            "checkpoint_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "expert_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)}


def measure_speed(folders: dict[str, Path], shipped: bool, device: str, repeats: int,
                  implementation: str | None) -> dict[str, dict]:
    """Every variant loaded in this one process and timed in interleaved rounds (round r times each variant once),
    so that a change of the machine's load falls on all of them alike; medians over the rounds."""
    from eep.arch import adapter_for

    models = {v: load_variant(f, v, device, implementation) for v, f in folders.items()}
    timers = {v: MoETimer(adapter_for(m), device) for v, m in models.items()}
    ids, prompt, new = workloads(next(iter(models.values())), shipped, device)
    times = {v: {"prefill": [], "moe": [], "share": [], "decode": [], "decode_moe": []} for v in models}
    with torch.no_grad():
        for model in models.values():
            model(input_ids=ids[:2, :16])   # warm-up
        for _ in range(repeats):
            for v, model in models.items():
                t = times[v]
                timers[v].reset()
                t["prefill"].append(timed(lambda: model(input_ids=ids), device))
                t["moe"].append(timers[v].seconds)
                t["share"].append(timers[v].skipped / timers[v].pairs)
                timers[v].reset()
                t["decode"].append(timed(lambda: decode(model, prompt, new), device))
                t["decode_moe"].append(timers[v].seconds)
    out = {}
    for v, t in times.items():
        med = {k: statistics.median(x) for k, x in t.items()}
        adapter = adapter_for(models[v])
        out[v] = {"variant": v, "experts": adapter.num_experts, "top_k": adapter.top_k,
                  "prefill_tokens_per_s": ids.numel() / med["prefill"], "prefill_s": med["prefill"],
                  "prefill_moe_s": med["moe"], "prefill_moe_share": med["moe"] / med["prefill"],
                  "skipped_pair_share": med["share"],
                  "decode_tokens_per_s": prompt.shape[0] * new / med["decode"], "decode_s": med["decode"],
                  "decode_moe_s": med["decode_moe"], "decode_moe_share": med["decode_moe"] / med["decode"],
                  "shapes": {"prefill": list(ids.shape), "decode": [*prompt.shape, new]},
                  "experts_implementation": models[v].config._experts_implementation, "repeats": repeats}
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Each variant against ``full`` of the same model and run."""
    full = next(r for r in rows if r["variant"] == "full")
    for r in rows:
        r["vs_full"] = {"prefill_speed": r["prefill_tokens_per_s"] / full["prefill_tokens_per_s"],
                        "prefill_moe_time": r["prefill_moe_s"] / full["prefill_moe_s"],
                        "decode_speed": r["decode_tokens_per_s"] / full["decode_tokens_per_s"],
                        "peak_memory_saved_bytes": full["peak_memory_bytes"] - r["peak_memory_bytes"],
                        "expert_bytes_saved": full["expert_bytes"] - r["expert_bytes"],
                        "checkpoint_saved_bytes": full["checkpoint_bytes"] - r["checkpoint_bytes"]}
    return rows


def last_json(cmd: list[str]):
    """The JSON a worker process prints last."""
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="skills-mixtral,skills-olmoe,skills-qwen3,random-mixtral")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts-implementations", default="grouped_mm,eager",
                        help="transformers' experts kernels to measure, comma-separated (eager, grouped_mm, batched_mm)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per measuring process (1: figures that survive a shared machine)")
    parser.add_argument("--out", default="inference")
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "VARIANT", "SHIPPED"), help=argparse.SUPPRESS)
    parser.add_argument("--speed-worker", nargs=2, metavar=("ROOT", "SHIPPED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        folder, variant, shipped = args.worker
        print(json.dumps(measure_memory(Path(folder), variant, shipped == "1", args.device,
                                        args.experts_implementations)))
        return
    if args.speed_worker:
        root, shipped = args.speed_worker
        print(json.dumps(measure_speed({v: Path(root) / v for v in VARIANTS}, shipped == "1", args.device,
                                       args.repeats, args.experts_implementations)))
        return
    results = {"load_at_start": load(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folders = prepare(name, Path(tmp))
            shipped = "0" if name == "random-mixtral" else "1"
            for implementation in args.experts_implementations.split(","):
                common = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats),
                          "--experts-implementations", implementation, "--threads", str(args.threads)]
                speed = last_json(common + ["--speed-worker", str(Path(tmp) / name), shipped])
                rows = [{**last_json(common + ["--worker", str(folder), variant, shipped]), **speed[variant]}
                        for variant, folder in folders.items()]
                for row in rows:
                    print(name, implementation, json.dumps(row), flush=True)
                results["models"][f"{name} {implementation}"] = ratios(rows)
    results["load_at_end"] = load()
    write(args.out, results)


if __name__ == "__main__":
    main()
