"""The archive of a search: every distinct evaluated genome with its fitness and phase, in evaluation order."""
from __future__ import annotations

from eep.genome import Genome


class Archive:
    """Every distinct evaluated genome by content hash, in evaluation order: ``hash -> (fitness, genome, phase)``.

    ``partial``: hashes scored only on a slice of the search documents (racing, ``search.racing``); they count toward
    a phase's budget but are never a parent, the best or a final candidate (``scored`` and ``best`` leave them out).
    """

    partial: set | None = None   # a class default: archives pickled before racing existed have none

    def __init__(self):
        self.entries: dict[str, tuple[float, Genome, str]] = {}
        self.partial = set()

    def __contains__(self, genome: Genome) -> bool:
        return genome.content_hash() in self.entries

    def fitness(self, genome: Genome) -> float:
        return self.entries[genome.content_hash()][0]

    def add(self, genome: Genome, fitness: float, phase: str, full: bool = True) -> None:
        self.entries[genome.content_hash()] = (fitness, genome, phase)
        if not full:
            self.partial = (self.partial or set()) | {genome.content_hash()}

    def is_full(self, genome: Genome) -> bool:
        return genome.content_hash() not in (self.partial or ())

    def scored(self, phase: str | None = None) -> list[tuple[float, Genome]]:
        """``(fitness, genome)`` of the fully scored entries (of ``phase``), in evaluation order."""
        partial = self.partial or ()
        return [(f, g) for k, (f, g, p) in self.entries.items()
                if (phase is None or p == phase) and k not in partial]

    def count(self, phase: str) -> int:
        return sum(p == phase for _, _, p in self.entries.values())

    def best(self) -> tuple[float, Genome]:
        return max(self.scored(), key=lambda item: item[0])
