"""The ask/tell loop of one search phase, in batches, with "never twice": a genome already evaluated is not
evaluated again.

Ordering rule (what makes a parallel run equal a serial run with the same ``ask_batch``):

1. **Ask.** A batch is formed by asking the proposer until it holds ``n = min(ask_batch, budget - evaluated so far)``
   distinct genomes that are new to the archive. An ask whose genome is already in the archive is told its recorded
   fitness at once (no evaluation, no budget); an ask repeating a genome already in the batch joins it (the genome
   is evaluated once and both asks are told its fitness).
2. **Evaluate.** The batch's distinct genomes are evaluated, one after another or concurrently on a pool of
   workers, in any order; each result is kept by content hash as it comes back.
3. **Commit.** When every result is back, the asks are taken **in ask order**: a new genome is added to the archive
   (and reported to ``on_evaluated``), and every ask is told its fitness.

The proposer therefore sees the same sequence of asks and tells whatever the number of workers and the order in which
results arrive, and the archive (and ``evaluations.jsonl``) lists genomes in ask order. ``ask_batch=1`` is the plain
serial loop: ask, evaluate, tell.

Exact resume: the pending batch (its asks and the results back so far) lives in a :class:`Batch` that the search
state holds and checkpoints after the asks, after every result and after the commit, so a run killed mid-batch loses
only the evaluations in flight; resumed, it evaluates the missing ones of the *same* asks (never re-asks them).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from eep.genome import Genome
from eep.search.archive import Archive

log = logging.getLogger(__name__)


def fitness_of(result) -> float:
    """The fitness of an evaluation result: a number, or an object with ``.fitness`` (``eep.search.run.Evaluation``)."""
    return float(getattr(result, "fitness", result))


@dataclass
class Batch:
    """The asks of the batch in progress (nothing pending when ``asks`` is empty).

    ``asks``: genomes in ask order, a content hash possibly repeated; ``results``: content hash -> result of the
    evaluations back so far; ``duplicates``: consecutive asks that found nothing new; ``exhausted``: the last fill
    hit the duplicate limit, so the phase ends after this batch.
    """

    asks: list[Genome] = field(default_factory=list)
    results: dict[str, object] = field(default_factory=dict)
    duplicates: int = 0
    exhausted: bool = False
    partial: dict | None = None   # racing: content hash -> the slice's result, while the batch is in progress
    cut: set | None = None        # racing: hashes whose slice result stands (not scored on the rest)

    def todo(self) -> list[Genome]:
        """Distinct genomes of the batch that have no result yet, in ask order."""
        seen, out = set(), []
        for genome in self.asks:
            key = genome.content_hash()
            if key not in self.results and key not in seen:
                seen.add(key)
                out.append(genome)
        return out


@dataclass(frozen=True)
class Racing:
    """Multi-fidelity scoring (``search.racing``): a new candidate is scored on the first ``slice`` share of the
    search documents (``stage="slice"``), and on all of them only if that score reaches the ``top``-th best full
    fitness in the archive (every candidate while fewer than ``top`` are fully scored). The decision is taken in the
    driver once the whole batch's slice results are in, so it is the same for any pool and on resume."""

    slice: float = 0.25
    top: int = 8

    def threshold(self, archive: Archive) -> float | None:
        full = sorted((f for f, _ in archive.scored()), reverse=True)
        return full[self.top - 1] if len(full) >= self.top else None


class SerialPool:
    """Evaluates the genomes of a batch one after another in this process with ``evaluate(genome) -> result``
    (``evaluate(genome, stage)`` for a racing stage other than the full one)."""

    def __init__(self, evaluate: Callable[..., object]):
        self.evaluate = evaluate

    def run(self, genomes: list[Genome], done: Callable[[Genome, object], None], stage: str | None = None) -> None:
        """Evaluate every genome and call ``done(genome, result)`` for each as it finishes."""
        for genome in genomes:
            done(genome, self.evaluate(genome) if stage is None else self.evaluate(genome, stage))


def as_pool(evaluate):
    """A pool (anything with ``run(genomes, done)``) as it is, or a function ``genome -> result`` as a SerialPool."""
    return evaluate if hasattr(evaluate, "run") else SerialPool(evaluate)


def run_phase(proposer, archive: Archive, evaluate, phase: str, budget: int,
              on_evaluated: Callable[[Genome, object], None] | None = None, max_duplicates: int = 10_000,
              stop: Callable[[], bool] | None = None, ask_batch: int = 1, batch: Batch | None = None,
              checkpoint: Callable[[], None] | None = None, racing: Racing | None = None) -> int:
    """Ask, evaluate and tell in batches (see the module's ordering rule) until the archive holds ``budget`` distinct
    genomes of ``phase``; return how many were evaluated now.

    ``evaluate``: ``genome -> fitness`` (or a result with ``.fitness``), or a pool with ``run(genomes, done)``.
    ``batch``: the pending batch to go on with (a resumed run) and to keep up to date for ``checkpoint()``.
    ``max_duplicates`` consecutive asks that bring nothing new end the phase early (the optimiser cannot find anything
    new), and so does ``stop()`` turning true (a time limit), checked between batches. ``racing``: score new
    genomes on a slice first (:class:`Racing`); those cut there enter the archive as partial.
    """
    pool, batch = as_pool(evaluate), Batch() if batch is None else batch
    save = checkpoint or (lambda: None)
    evaluated = 0
    while batch.asks or not (archive.count(phase) >= budget or batch.exhausted or (stop is not None and stop())):
        if not batch.asks:
            _fill(batch, proposer, archive, min(ask_batch, budget - archive.count(phase)), max_duplicates, phase)
            if not batch.asks:
                break
            save()
        if racing is None:
            _evaluate(batch, pool, save)
        else:
            _race(batch, pool, save, racing, archive)
        evaluated += _commit(batch, proposer, archive, phase, on_evaluated)
        save()
    if archive.count(phase) >= budget or batch.exhausted:  # the phase is over: the next one starts afresh
        batch.duplicates, batch.exhausted = 0, False
    return evaluated


def _fill(batch: Batch, proposer, archive: Archive, size: int, max_duplicates: int, phase: str) -> None:
    """Ask until the batch holds ``size`` distinct new genomes; asks of archived genomes are told at once."""
    distinct = {g.content_hash() for g in batch.asks}
    while len(distinct) < size:
        genome = proposer.ask()
        if genome in archive:
            _tell(proposer, archive, genome)
        else:
            batch.asks.append(genome)
        if genome in archive or genome.content_hash() in distinct:
            batch.duplicates += 1
            if batch.duplicates >= max_duplicates:
                log.warning("phase %s: %d duplicates in a row; ending it after %d distinct evaluations", phase,
                            batch.duplicates, archive.count(phase) + len(distinct))
                batch.exhausted = True
                return
            continue
        batch.duplicates = 0
        distinct.add(genome.content_hash())


def _evaluate(batch: Batch, pool, save: Callable[[], None]) -> None:
    """Evaluate the batch's missing genomes; checkpoint after each result except the last (the commit follows)."""
    todo = batch.todo()
    left = [len(todo)]

    def done(genome: Genome, result) -> None:
        batch.results[genome.content_hash()] = result
        left[0] -= 1
        if left[0] > 0:
            save()

    if todo:
        pool.run(todo, done)


def _with_slice_cost(result, first):
    """``result`` (a full evaluation) with the forward tokens and seconds of racing's ``first`` stage added, the
    slice the candidate was scored on before it was let through (bare numbers, as in tests, have no cost)."""
    if not (hasattr(result, "forward_tokens") and hasattr(first, "forward_tokens")):
        return result
    return replace(result, forward_tokens=result.forward_tokens + first.forward_tokens,
                   seconds=round(result.seconds + first.seconds, 4))


def _tell(proposer, archive: Archive, genome: Genome) -> None:
    """Tell ``genome``'s recorded fitness; a genome cut by racing is told so (``full=False``)."""
    if archive.is_full(genome):
        proposer.tell(genome, archive.fitness(genome))
    else:
        proposer.tell(genome, archive.fitness(genome), full=False)


def _race(batch: Batch, pool, save: Callable[[], None], racing: Racing, archive: Archive) -> None:
    """Racing: the slice for every new genome of the batch, then the rest for those that may enter the top."""
    batch.partial = {} if batch.partial is None else batch.partial
    first = [g for g in batch.todo() if g.content_hash() not in batch.partial]

    def sliced(genome: Genome, result) -> None:
        batch.partial[genome.content_hash()] = result
        save()

    if first:
        pool.run(first, sliced, stage="slice")
    threshold = racing.threshold(archive)
    batch.cut = set()
    for genome in batch.todo():  # the cut ones get their slice result; the rest is scored fully below
        key = genome.content_hash()
        if threshold is not None and fitness_of(batch.partial[key]) < threshold:
            batch.cut.add(key)
            batch.results[key] = batch.partial[key]
    _evaluate(batch, pool, save)


def _commit(batch: Batch, proposer, archive: Archive, phase: str, on_evaluated) -> int:
    """Add the batch's new genomes to the archive and tell every ask its fitness, in ask order; empty the batch.
    A genome cut by racing is told its slice fitness capped at the worst fully scored one (never above a fully
    scored genome) and kept out of the EEP strategy's parents."""
    added, cut, sliced = 0, batch.cut or set(), batch.partial or {}
    floor = min((f for f, _ in archive.scored()), default=None)
    for genome in batch.asks:
        key = genome.content_hash()
        result = batch.results[key]
        full = key not in cut
        if full and key in sliced:   # racing scored it on the slice, then fully: both passes are its cost
            result = _with_slice_cost(result, sliced[key])
        fitness = fitness_of(result) if full or floor is None else min(fitness_of(result), floor)
        if genome not in archive:
            archive.add(genome, fitness, phase, full=full)
            added += 1
            if on_evaluated is not None:
                on_evaluated(genome, result)
        _tell(proposer, archive, genome)
    batch.asks, batch.results, batch.partial, batch.cut = [], {}, None, None
    return added
