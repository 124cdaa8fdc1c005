"""Evaluations per minute over a long search: the best serial run vs ``--workers`` Ray workers, start-up apart.

    python bench/parallel.py [--model skills_mixtral] [--task skills_sort] [--limit 100] [--evaluations 200]
                             [--workers 2] [--threads 1] [--queued]

Target: ``--workers 2`` workers of one thread reach >= 1.6x the throughput of the best serial run (the faster of
one process with 1 torch thread and with 2), over a long search (>= 200 evaluations), start-up not counted.

Every side scores the same ``--evaluations`` distinct random pruning genomes (half the experts of every layer) with
replicas built as eep-search builds them (``eep.app.session.Session``, in Ray workers through
``eep.app.session.replica_scorer``, from the composed config with ``evaluator.limit=--limit``). Measured, in order:

1. serial, 1 torch thread, then serial, 2 torch threads (Ray not started): the wall time over all genomes, after one
   warm-up evaluation; the best serial run is the faster;
2. Ray start-up, reported apart: the local cluster (``eep.parallel.connect``, Ray imported and initialised), then
   the workers ready (``eep.parallel.RayPool``: every worker has loaded its model and built its evaluator), then one
   first evaluation per worker (first-call costs);
3. throughput: the wall time of the pool over all genomes in batches of ``--workers``, each batch waited for before
   the next is sent, as eep-search does with ``evaluator.workers`` = ``search.ask_batch``; with ``--queued`` also
   every genome queued at once (the pool's own throughput).

The parallel fitness of every genome must equal the 1-thread serial run's (workers run one thread each); whether
the 2-thread serial run agrees is recorded. Since other work on the machine changes the figures, the load average is
recorded before and after every step, and a control before and after: how much faster two processes finish two equal
pure-Python loops than one process (2.0x on two free cores). Raw results: ``bench/results/parallel.json``.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import random
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import eep
from eep.genome import Genome
from eep.parallel import RayPool, connect, local_cores
from eep.app.session import Session, replica_scorer
from record import load, write

TARGET = 1.6  # parallel throughput / best serial throughput, over >= 200 evaluations


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


def summary(name: str, seconds: float, scores: dict, n: int, load_before, load_after) -> dict:
    per_min = 60 * n / seconds
    inside = statistics.median(s for _, s in scores.values())
    print(f"{name:<40} {per_min:7.1f} evaluations/min ({seconds:6.1f} s for {n}; median {inside:.3f} s inside the "
          f"scorer; load {load_before} -> {load_after})", flush=True)
    return {"seconds": seconds, "evaluations": n, "per_minute": per_min, "median_scorer_seconds": inside,
            "scorer_seconds": [s for _, s in scores.values()], "load_before": load_before, "load_after": load_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="skills_mixtral")
    parser.add_argument("--task", default="skills_sort")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--queued", action="store_true", help="also time every genome queued at once")
    parser.add_argument("--out", default="parallel", help="raw results: bench/results/<out>.json")
    args = parser.parse_args()
    cfg = config(args)
    rec = {"settings": vars(args), "target": f"parallel / best serial >= {TARGET} over >= 200 evaluations",
           "load_at_start": load()}
    torch.set_num_threads(1)
    replica = Session(cfg)
    a = replica.mat.adapter
    candidates = genomes(args.evaluations + 1, len(a.layers), a.num_experts, a.top_k)
    warm, candidates = candidates[:1], candidates[1:]
    print(f"{local_cores()} cores, torch {torch.__version__}, {args.model} {args.task} limit {args.limit}, "
          f"{args.evaluations} evaluations; load {rec['load_at_start']}")
    rec["control_before"] = cpu_control()
    print(f"control: two processes finish two loops {rec['control_before']:.2f}x faster than one", flush=True)

    fitness, rows = {}, {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        serial(replica, warm)
        before = load()
        seconds, scores = serial(replica, candidates)
        rows[f"serial_{threads}_thread"] = summary(f"serial, {threads} torch thread(s)", seconds, scores,
                                                  len(candidates), before, load())
        fitness[threads] = {h: f for h, (f, _) in scores.items()}
    best = min(("serial_1_thread", "serial_2_thread"), key=lambda k: rows[k]["seconds"])

    startup = {"load_before": load()}
    start = time.perf_counter()
    owns_ray = connect(None, args.workers, args.threads)
    startup["cluster_seconds"] = time.perf_counter() - start
    build = functools.partial(replica_scorer, OmegaConf.to_container(cfg, resolve=True))
    start = time.perf_counter()
    pool = RayPool(build, args.workers, args.threads, None, gpus=False)
    startup["workers_ready_seconds"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        parallel(pool, genomes(args.workers, len(a.layers), a.num_experts, a.top_k, seed=1))  # one per worker
        startup["first_evaluations_seconds"] = time.perf_counter() - start
        startup["load_after"] = load()
        print(f"Ray start-up: cluster {startup['cluster_seconds']:.1f} s, {args.workers} workers ready "
              f"{startup['workers_ready_seconds']:.1f} s, a first evaluation on each "
              f"{startup['first_evaluations_seconds']:.1f} s (not counted below)", flush=True)
        modes = {"batches": args.workers} | ({"queued": None} if args.queued else {})
        for mode, batch in modes.items():
            before = load()
            seconds, scores = parallel(pool, candidates, batch)
            label = (f"{args.workers} workers x {args.threads} thread(s), "
                     + (f"batches of {args.workers}" if batch else "all queued"))
            rows[f"parallel_{mode}"] = summary(label, seconds, scores, len(candidates), before, load())
            same = {h: f for h, (f, _) in scores.items()} == fitness[1]
            assert same, f"parallel ({mode}) fitness differs from the 1-thread serial run's"
    finally:
        pool.close()
        if owns_ray:
            import ray

            ray.shutdown()
    rec["control_after"] = cpu_control()
    for mode in [k for k in rows if k.startswith("parallel")]:
        rows[mode]["over_best_serial"] = rows[best]["seconds"] / rows[mode]["seconds"]
    head = rows["parallel_batches"]["over_best_serial"]
    verdict = "n/a: under 200 evaluations" if args.evaluations < 200 else "met" if head >= TARGET else "NOT met"
    print(f"control after: {rec['control_after']:.2f}x; best serial: {best.replace('_', ' ')}; {args.workers} "
          f"workers in batches of {args.workers}: {head:.2f}x the best serial throughput (target >= {TARGET}: "
          f"{verdict})")
    write(args.out, {**rec, "startup": startup, "rows": rows, "best_serial": best,
                     "serial_2_thread_fitness_equals_1_thread": fitness[2] == fitness[1],
                     "parallel_over_best_serial": head, "target_met": head >= TARGET and args.evaluations >= 200,
                     "load_at_end": load()})


if __name__ == "__main__":
    main()
