"""After the search: the final candidate, picked among the best on the search split by its validation score."""
from __future__ import annotations

import logging

from eep.genome import Genome
from eep.search.archive import Archive

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
