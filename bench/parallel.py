"""Candidates per minute: one serial replica vs ``--workers`` Ray workers, each with ``--threads`` torch threads.

    python bench/parallel.py [--model skills_mixtral] [--task skills_sort] [--limit 100] [--candidates 40]
                             [--workers 2] [--threads 1] [--rounds 1]

Both sides score the same random pruning genomes (half the experts of every layer) with replicas built exactly as
eep-search builds them (``eep.search.app.Replica`` from the composed config ``evaluator.limit=--limit``); counted is
apply + score + metrics of every candidate (the serial loop) or the wall time of ``RayPool.run`` over them
(parallel), set-up (model loading, Ray and worker start-up) excluded. Parallel is measured twice: in batches of
``--workers`` candidates, each waited for before the next is sent, as eep-search does with ``search.ask_batch`` =
workers (the headline figure), and with every candidate queued at once (the pool's own throughput). The fitness of every genome must agree between
the two. ``--rounds`` alternates serial and parallel measurements and reports medians. Since other work on the
machine changes the figures, it prints the load averages before and after and a control: how much faster two
processes of pure Python finish two equal loops than one process (2.0x on two free cores).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

import eep
from eep.genome import Genome
from eep.parallel import RayPool, local_cores
from eep.search import app


def config(args):
    overrides = [f"model={args.model}", f"task={args.task}", f"evaluator.limit={args.limit}",
                 f"evaluator.threads={args.threads}", f"evaluator.workers={args.workers}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(eep.conf_dir())):
        return compose(config_name="eep_search", overrides=overrides)


def genomes(n: int, layers: int, experts: int, top_k: int, seed: int = 0) -> list[Genome]:
    """``n`` distinct random pruning genomes keeping half the experts of every layer."""
    rng, out = random.Random(seed), {}
    while len(out) < n:
        kept = [sorted(rng.sample(range(experts), experts // 2)) for _ in range(layers)]
        genome = Genome.pruning(kept, experts, min(top_k, experts // 2))
        out.setdefault(genome.content_hash(), genome)
    return list(out.values())


def serial(replica, candidates) -> tuple[float, dict]:
    """Wall time over all candidates and ``hash -> (fitness, seconds the scorer measured)``."""
    start, scores = time.perf_counter(), {}
    for genome in candidates:
        result = replica.score(genome)
        scores[genome.content_hash()] = (result.fitness, result.seconds)
    return time.perf_counter() - start, scores


def parallel(pool, candidates, batch: int | None = None) -> tuple[float, dict]:
    """Like ``serial`` on the pool, in batches of ``batch`` (None: all queued at once)."""
    start, scores, batch = time.perf_counter(), {}, batch or len(candidates)
    for i in range(0, len(candidates), batch):
        pool.run(candidates[i:i + batch],
                 lambda g, result: scores.__setitem__(g.content_hash(), (result.fitness, result.seconds)))
    return time.perf_counter() - start, scores


def _spin(_) -> float:
    start, x = time.perf_counter(), 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - start


def cpu_control() -> float:
    """Two equal pure-Python loops: time in one process, twice, over time in two processes at once."""
    one = _spin(0) + _spin(0)
    with multiprocessing.Pool(2) as procs:
        start = time.perf_counter()
        procs.map(_spin, [0, 1])
        return one / (time.perf_counter() - start)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="skills_mixtral")
    parser.add_argument("--task", default="skills_sort")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    cfg = config(args)
    torch.set_num_threads(args.threads)
    replica = app.Replica(cfg)
    a = replica.mat.adapter
    candidates = genomes(args.candidates, len(a.layers), a.num_experts, a.top_k)
    print(f"{platform.processor() or platform.machine()}, {local_cores()} cores, torch {torch.__version__}, "
          f"{args.model} {args.task} limit {args.limit}, {args.candidates} candidates; load before: {load()}")
    print(f"control: two processes finish two loops {cpu_control():.2f}x faster than one")
    with app._pool(cfg, None) as pool:
        times, spent = measure(replica, pool, candidates, args.workers, args.rounds)
    report(args, times, spent)


def measure(replica, pool, candidates, workers: int, rounds: int) -> tuple[dict, dict]:
    """Alternating rounds of serial, parallel in batches of ``workers`` and parallel all queued: per mode the wall
    times and the scorer's seconds per candidate; every mode must give every genome the same fitness."""
    modes = {"serial": lambda c: serial(replica, c), "batches": lambda c: parallel(pool, c, workers),
             "queued": lambda c: parallel(pool, c)}
    times, fitness, spent = {name: [] for name in modes}, {}, {name: [] for name in modes}
    modes["serial"](candidates[:2])  # warm-up: first-call costs on both sides
    modes["queued"](candidates[:2])
    for _ in range(rounds):
        for name, run in modes.items():
            seconds, scores = run(candidates)
            times[name].append(seconds)
            per = {h: f for h, (f, _) in scores.items()}
            assert fitness.setdefault(name, per) == per, f"{name}: fitness changed between rounds"
            spent[name].extend(s for _, s in scores.values())
    assert fitness["serial"] == fitness["batches"] == fitness["queued"], "serial and parallel fitness differ"
    return times, spent


def report(args, times: dict, spent: dict) -> None:
    print(f"control after: {cpu_control():.2f}x; median seconds per candidate inside the scorer: serial "
          f"{statistics.median(spent['serial']):.3f}, workers {statistics.median(spent['batches']):.3f}")
    per_min = {name: 60 * args.candidates / statistics.median(t) for name, t in times.items()}
    labels = {"serial": f"1 worker x {args.threads} thread(s)",
              "batches": f"{args.workers} workers x {args.threads}, batches of {args.workers}",
              "queued": f"{args.workers} workers x {args.threads}, all queued"}
    for name, label in labels.items():
        ratio = per_min[name] / per_min["serial"]
        print(f"{label:<36} {per_min[name]:7.1f} candidates/min ({statistics.median(times[name]):.2f} s for "
              f"{args.candidates}; {ratio:.2f}x)")
    print(f"same fitness for every genome; load after: {load()}")


if __name__ == "__main__":
    main()
