"""Candidate evaluation on Ray: N actors, each holding its own model replica, evaluate the genomes of a batch.

``RayPool(build, workers=N)`` starts N actors (``num_gpus=1`` each where the cluster has GPUs and ``gpus=True``).
Each calls ``build()`` once, in its own process, to get its scoring function ``genome -> result`` (for eep-search:
``eep.app.session.replica_scorer``, which loads the model, a ``Materializer`` and the search ``Evaluator`` exactly as
a serial run does). ``pool.run(genomes, done)`` sends each genome as its tensors (``W_RM``, ``W_EM: float32[G, E',
E]``, top-k', layer groups: the worker rebuilds the identical genome) to the next free actor and calls
``done(genome, result)`` in the driver as results come back, in completion order; the search loop
(``eep.search.loop``) then commits the batch in ask order, which is what makes the results equal a serial run's.

A worker that dies mid-candidate (its process killed, out of memory: ``ray.exceptions.RayActorError``) is replaced
by a fresh actor and its genome re-queued; the event is logged. A genome that kills ``max_retries`` workers in a row
stops the search with a ``WorkerLost`` error (the run stays resumable).
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A genome killed its worker ``max_retries`` times."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("evaluator.workers > 1 needs Ray: pip install 'eep[ray]'") from None
    return ray


def local_cores() -> int:
    """CPU cores this process may use (its affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def connect(address: str | None, workers: int, threads: int) -> bool:
    """Join the cluster at ``address``, or start a local Ray instance with room for ``workers x threads`` CPUs;
    nothing if Ray is already initialised. True if this call started (and so should shut down) Ray."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        cpus = max(local_cores(), workers * threads)
        log.info("starting a local Ray instance with %d CPUs", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


class _Worker:
    """The actor: builds its scoring function once, then scores genomes sent as tensors (``payload``)."""

    def __init__(self, build: Callable[[], Callable], threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.score = build()

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, genome: dict, stage: str | None = None):
        from eep.genome import Genome

        return self.score(Genome(**genome)) if stage is None else self.score(Genome(**genome), stage)


def payload(genome) -> dict:
    """What travels to a worker: the genome's fields (tensors are exact, unlike a JSON round trip of a merging
    genome whose one-hot rows repeat an expert)."""
    return {"router_map": genome.router_map, "merge": genome.merge, "top_k": genome.top_k, "groups": genome.groups,
            "gate_rows": genome.gate_rows}


class RayPool:
    """N Ray actors scoring genomes; a pool for ``eep.search.loop.run_phase`` (``run(genomes, done)``).

    ``build``: a picklable zero-argument callable run once in every actor, returning ``genome -> result``;
    ``threads``: torch threads per actor (default: the cluster's CPUs // workers); ``address``: a Ray cluster to
    join (None: start a local instance, unless Ray is already initialised); ``gpus``: one GPU per actor if the
    cluster has GPUs. ``events`` lists the worker restarts (slot, genome hash, error).
    """

    def __init__(self, build: Callable[[], Callable], workers: int, threads: int | None = None,
                 address: str | None = None, gpus: bool = True, max_retries: int = 3):
        ray = _ray()
        self.owns_ray = connect(address, workers, threads or 1)
        resources = ray.cluster_resources()
        self.threads = threads or max(1, int(resources.get("CPU", 1)) // workers)
        gpu = 1 if gpus and resources.get("GPU", 0) >= 1 else 0
        self.actor_class = ray.remote(_Worker).options(num_cpus=self.threads, num_gpus=gpu, max_restarts=0)
        self.build, self.max_retries, self.events = build, max_retries, []
        self.actors = [self._start() for _ in range(workers)]
        self.pids = self._ready()
        log.info("%d Ray workers ready (%d torch threads each, %d GPU each)", workers, self.threads, gpu)

    def _start(self):
        return self.actor_class.remote(self.build, self.threads)

    def _ready(self) -> list[int]:
        """Wait for every actor to have built its scorer; a failure to start is a RuntimeError with the cause."""
        ray = _ray()
        try:
            return ray.get([actor.pid.remote() for actor in self.actors])
        except ray.exceptions.RayError as err:
            self.close()
            raise RuntimeError(f"a Ray worker failed to start: {err}") from None

    def run(self, genomes: list, done: Callable, stage: str | None = None) -> None:
        """Score ``genomes`` on the free actors (``stage``: racing's, passed to the scorer); ``done(genome,
        result)`` as each comes back (completion order). A dead worker is replaced and its genome re-queued."""
        ray = _ray()
        queue, idle, running, failures = deque(genomes), deque(range(len(self.actors))), {}, {}
        while queue or running:
            while queue and idle:
                slot, genome = idle.popleft(), queue.popleft()
                running[self.actors[slot].evaluate.remote(payload(genome), stage)] = (slot, genome)
            [ref], _ = ray.wait(list(running), num_returns=1)
            slot, genome = running.pop(ref)
            idle.append(slot)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self._replace(slot, genome, err, failures)
                queue.appendleft(genome)
                continue
            done(genome, result)

    def _replace(self, slot: int, genome, err: Exception, failures: dict) -> None:
        """Log the death of worker ``slot``, give up after ``max_retries`` deaths on one genome, start a new one."""
        key = genome.content_hash()
        failures[key] = failures.get(key, 0) + 1
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        self.events.append({"time": time.time(), "worker": slot, "genome_hash": key, "error": reason})
        log.warning("Ray worker %d died while evaluating genome %s (%s); starting a new worker and re-queueing the "
                    "genome (death %d of at most %d for it)", slot, key, reason, failures[key], self.max_retries)
        if failures[key] >= self.max_retries:
            raise WorkerLost(f"genome {key} killed {failures[key]} Ray workers in a row ({reason}); the search "
                             f"stopped and can be resumed")
        _ray().kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._start()

    def close(self) -> None:
        """Stop the actors, and Ray itself if this pool started it."""
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.owns_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
