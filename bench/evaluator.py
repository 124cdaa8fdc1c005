"""Per-candidate scoring time: eep's Evaluator vs its forwards alone vs a bare loop vs ``simple_evaluate``.

    python bench/evaluator.py [--models skills-mixtral,skills-olmoe] [--limit 200] [--candidates 5]
                              [--repeats 3] [--batch-size 64] [--threads N]

Target: the Evaluator costs at most 1.10x its "forwards alone" (the model calls no scorer can avoid), per output
type. Raw results (every time, the load average before every round, machine, commit, command):
``bench/results/evaluator.json``.

Each candidate is a random pruning genome (half the experts of every layer: 4 of 8 on skills-mixtral); the time
counted is apply + score + metrics (one-time set-up excluded, and a first call of each made before timing). The floor is a hand-written loop with no lm-eval code over the same pre-tokenised
requests at the same batch size: one forward per distinct sequence (contexts shared by single-token continuations
scored once), and greedy ``generate`` with the same ``max_new_tokens`` and the newline as stop token. For reference
"forwards alone": only the model calls over the Evaluator's own prepared batches (forward + log-softmax, or
``generate``), no scoring, decoding or metrics: the target's reference. The four are timed in turn for every
candidate, ``--repeats`` times; per candidate each column's best of the repeats counts (other work on the cores only
adds time), then the median over candidates; ratios from the same run ("paired": the median of the per-candidate
ratios).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import eep.zoo
from eep.evaluate.evaluator import Evaluator
from eep.evaluate.reference import simple_scores
from eep.genome import Genome
from eep.materialize import Materializer
from record import load, write

TARGET = 1.10  # eep / forwards alone, per output type


@torch.no_grad()
def floor_loglikelihood(model, encoded, batch_size: int, pad_id: int) -> list[float]:
    """Sum of continuation log-probs per request, one forward per distinct sequence."""
    seqs: dict[tuple[int, ...], int] = {}
    for _, ctx, cont in encoded:
        seqs.setdefault(tuple(ctx + cont[:-1]) if len(cont) > 1 else tuple(ctx), len(seqs))
    order = sorted(seqs, key=len, reverse=True)
    logprobs: dict[tuple[int, ...], torch.Tensor] = {}
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
        out = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        for r, s in enumerate(chunk):
            logprobs[s] = out[r, :len(s)]
    scores = []
    for _, ctx, cont in encoded:
        seq = tuple(ctx + cont[:-1]) if len(cont) > 1 else tuple(ctx)
        lp = logprobs[seq][len(ctx) - 1:len(ctx) - 1 + len(cont)]
        scores.append(lp.gather(1, torch.tensor(cont)[:, None]).sum().item())
    return scores


@torch.no_grad()
def floor_generate(model, tok, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    stop = [tok.convert_tokens_to_ids("\n"), tok.eos_token_id]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    tok.padding_side = "left"
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)
        for j, text in zip(idx, tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            out[j] = text.split("\n")[0]
    tok.padding_side = "right"
    return out


@torch.no_grad()
def forwards_alone(model, ev: Evaluator) -> None:
    """The model calls of one ``ev.evaluate()`` and nothing else: its prepared batches, already on the device."""
    if ev._loglikelihood is not None:
        for batch in ev._loglikelihood.batches:
            F.log_softmax(model(input_ids=batch.ids).logits, dim=-1)
    if ev._generation is not None:
        for batch in ev._generation.batches:
            ev._generation._generate(batch)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_task(model, tok, task: str, limit: int, batch_size: int, genomes: list[Genome], repeats: int) -> dict:
    mat = Materializer(model)
    ev = Evaluator(model, tok, [task], role="test", limit=limit, batch_size=batch_size)
    kind = "loglikelihood" if ev.encoded else "generate_until"
    prompts = [inst.args[0] for inst in ev.requests.get("generate_until", [])]
    gen_toks = next(iter(ev.tasks.values())).config.generation_kwargs.get("max_gen_toks", 256) if prompts else 0

    def floor():
        if ev.encoded:
            floor_loglikelihood(model, ev.encoded, batch_size, tok.pad_token_id)
        else:
            floor_generate(model, tok, prompts, batch_size, gen_toks)

    simple_scores(model, tok, [task], limit=limit, batch_size=batch_size)  # warm-up: task index and caches
    ev.evaluate(), floor(), forwards_alone(model, ev)  # warm-up: first-call costs (the Evaluator's metric set-up)
    runs = {"eep": lambda: fitness.append(ev.evaluate().fitness), "floor": floor,
            "forwards": lambda: forwards_alone(model, ev),
            "simple_evaluate": lambda: simple_scores(model, tok, [task], limit=limit, batch_size=batch_size)}
    times = {name: [] for name in runs}  # [candidate][repeat]
    loads, fitness = [], []
    for genome in genomes:
        for name in runs:
            times[name].append([])
        for _ in range(repeats):
            loads.append(load())
            for name, run in runs.items():
                times[name][-1].append(timed(lambda: (mat.apply(genome), run())))
    loads.append(load())
    mat.restore()
    best = {name: [min(t) for t in per] for name, per in times.items()}  # best of the repeats, per candidate
    med = {name: statistics.median(b) for name, b in best.items()}
    paired = statistics.median(e / f for e, f in zip(best["eep"], best["forwards"], strict=True))
    return {"task": task, "kind": kind, "requests": len(ev.encoded) or len(prompts), "median_seconds": med,
            "eep_over_forwards": med["eep"] / med["forwards"], "eep_over_forwards_paired": paired,
            "eep_over_floor": med["eep"] / med["floor"], "simple_over_eep": med["simple_evaluate"] / med["eep"],
            "target_met": med["eep"] / med["forwards"] <= TARGET, "seconds_per_candidate_and_repeat": times,
            "fitness": fitness, "load_before_each_repeat_and_after": loads}


def bench_model(name: str, args) -> dict:
    folder = eep.zoo.path(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    mat = Materializer(model)
    n_exp = mat.adapter.num_experts
    rng = random.Random(0)
    genomes = [Genome.pruning([rng.sample(range(n_exp), n_exp // 2) for _ in mat.layers], n_exp, mat.adapter.top_k)
               for _ in range(args.candidates)]
    rows = []
    for task in args.tasks.split(","):
        r = bench_task(model, tok, task, args.limit, args.batch_size, genomes, args.repeats)
        med = r["median_seconds"]
        print(f"{name:<15} {r['task']:<16} {r['kind']:<15} {r['requests']:>5} requests  eep {med['eep'] * 1e3:8.1f} ms"
              f"  forwards alone {med['forwards'] * 1e3:8.1f} ms  floor {med['floor'] * 1e3:8.1f} ms  "
              f"simple_evaluate {med['simple_evaluate'] * 1e3:8.1f} ms  eep/forwards {r['eep_over_forwards']:.3f}x "
              f"(target <= {TARGET:.2f}x: {'met' if r['target_met'] else 'NOT met'}; paired "
              f"{r['eep_over_forwards_paired']:.3f}x)  eep/floor "
              f"{r['eep_over_floor']:.2f}x  simple_evaluate/eep {r['simple_over_eep']:.2f}x  load "
              f"{r['load_before_each_repeat_and_after'][0]} -> {r['load_before_each_repeat_and_after'][-1]}",
              flush=True)
        rows.append({"model": name, **r})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="skills-mixtral,skills-olmoe")
    parser.add_argument("--tasks", default="skills_count_mc,skills_sort")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per candidate; each column's best counts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="evaluator", help="raw results: bench/results/<out>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the floor's max_new_tokens vs the model's max_length, per call
    start = load()
    print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; limit {args.limit}, batch "
          f"{args.batch_size}, {args.candidates} candidates; load average {start}")
    rows = [row for name in args.models.split(",") for row in bench_model(name, args)]
    write(args.out, {"settings": vars(args), "target": f"eep / forwards alone <= {TARGET}", "load_at_start": start,
                     "load_at_end": load(), "rows": rows})


if __name__ == "__main__":
    main()
