"""The archive of a search: every distinct evaluated genome with its fitness and phase, in evaluation order."""
from __future__ import annotations

from eep.genome import Genome


class Archive:
    """Every distinct evaluated genome by content hash, in evaluation order: ``hash -> (fitness, genome, phase)``."""

    def __init__(self):
        self.entries: dict[str, tuple[float, Genome, str]] = {}

    def __contains__(self, genome: Genome) -> bool:
        return genome.content_hash() in self.entries

    def fitness(self, genome: Genome) -> float:
        return self.entries[genome.content_hash()][0]

    def add(self, genome: Genome, fitness: float, phase: str) -> None:
        self.entries[genome.content_hash()] = (fitness, genome, phase)

    def scored(self, phase: str | None = None) -> list[tuple[float, Genome]]:
        return [(f, g) for f, g, p in self.entries.values() if phase is None or p == phase]

    def count(self, phase: str) -> int:
        return sum(p == phase for _, _, p in self.entries.values())

    def best(self) -> tuple[float, Genome]:
        return max(self.scored(), key=lambda item: item[0])
