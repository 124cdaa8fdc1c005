"""The ask/tell loop of one search phase, with "never twice": a genome already evaluated is not evaluated again."""
from __future__ import annotations

import logging
from collections.abc import Callable

from eep.genome import Genome
from eep.search.proposers import Archive

log = logging.getLogger(__name__)


def run_phase(proposer, archive: Archive, evaluate: Callable[[Genome], float], phase: str, budget: int,
              on_evaluated: Callable[[Genome, float], None] | None = None, max_duplicates: int = 10_000,
              stop: Callable[[], bool] | None = None) -> int:
    """Ask, evaluate and tell until the archive holds ``budget`` distinct genomes of ``phase``; return how many were
    evaluated now.

    A genome whose content hash is in the archive is told its recorded fitness and costs no evaluation and no budget.
    ``max_duplicates`` consecutive duplicates end the phase early (the optimiser cannot find anything new), and so
    does ``stop()`` turning true (a time limit).
    """
    evaluated, duplicates = 0, 0
    while archive.count(phase) < budget and not (stop is not None and stop()):
        genome = proposer.ask()
        if genome in archive:
            proposer.tell(genome, archive.fitness(genome))
            duplicates += 1
            if duplicates >= max_duplicates:
                log.warning("phase %s: %d duplicates in a row; ending it after %d distinct evaluations", phase,
                            duplicates, archive.count(phase))
                break
            continue
        duplicates = 0
        fitness = evaluate(genome)
        archive.add(genome, fitness, phase)
        proposer.tell(genome, fitness)
        evaluated += 1
        if on_evaluated is not None:
            on_evaluated(genome, fitness)
    return evaluated
