"""Sources of candidates for one search phase: the EEP strategy, or any nevergrad registry optimiser.

A proposer ``ask()``s a genome and is ``tell()``-ed its fitness (maximised). The archive of evaluated genomes is
shared; a proposer that asks a genome already in the archive is told its recorded fitness instead of evaluating it
again (the EEP strategy re-draws such children itself).
"""
from __future__ import annotations

import difflib
import random

import numpy as np
import torch

from eep.genome import Genome
from eep.search.strategy import (EEPSettings, _revive_empty_rows, crossover, mutate_matrices, mutate_subsets,
                                 parents, random_subsets)

PHASES = ("prune", "merge")


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


class _EEP:
    """Shared by both EEP phases: draw children until one is new to the archive."""

    archive: Archive
    redraws: int

    def _draw(self) -> Genome:
        raise NotImplementedError

    def ask(self) -> Genome:
        for _ in range(self.redraws):
            genome = self._draw()
            if genome not in self.archive:
                return genome
        return genome  # the reachable space is exhausted: the loop reuses the recorded fitness

    def tell(self, genome: Genome, fitness: float) -> None:
        """The archive is the population: nothing to update."""


class EEPPruning(_EEP):
    """Pruning phase: ``population`` random subsets, then children of near-best parents (duplicates re-drawn)."""

    def __init__(self, archive: Archive, groups, num_experts: int, num_kept: int, top_k: int, seed: int,
                 settings: EEPSettings | None = None, expert_groups: int = 1, redraws: int = 1000):
        self.archive, self.groups, self.settings = archive, tuple(groups), settings or EEPSettings()
        self.num_experts, self.num_kept, self.top_k = num_experts, num_kept, top_k
        self.expert_groups, self.redraws = expert_groups, redraws
        self.rng = random.Random(seed)

    def _genome(self, kept) -> Genome:
        return Genome.pruning(kept, self.num_experts, self.top_k, self.groups)

    def _draw(self) -> Genome:
        if self.archive.count("prune") < self.settings.population:
            return self._genome(random_subsets(len(self.groups), self.num_experts, self.num_kept, self.rng,
                                               self.expert_groups))
        parent = self.rng.choice(parents(self.archive.scored("prune"), self.settings.parent_margin))
        kept = [parent.kept(g[0]) for g in self.groups]
        return self._genome(mutate_subsets(kept, self.num_experts, self.settings, self.rng, self.expert_groups))


class EEPMerging(_EEP):
    """Merging phase: children of near-best archive members by Gaussian noise or row crossover."""

    def __init__(self, archive: Archive, seed: int, settings: EEPSettings | None = None, redraws: int = 1000):
        self.archive, self.settings, self.redraws = archive, settings or EEPSettings(), redraws
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def _draw(self) -> Genome:
        s, scored = self.settings, self.archive.scored()
        if self.rng.random() < s.crossover:
            pool = parents(scored, s.crossover_margin, s.crossover_min_parents)
            if len(pool) >= 2:
                a, b = self.rng.sample(pool, 2)
                return crossover(a, b, s, self.gen)
        return mutate_matrices(self.rng.choice(parents(scored, s.parent_margin)), s, self.gen)


def nevergrad_optimizer(name: str, parametrization, budget: int | None, seed: int):
    """The registry optimiser ``name`` (an unknown name is a ValueError that suggests close names)."""
    import nevergrad as ng

    registry = ng.optimizers.registry
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown nevergrad optimizer {name!r}.{hint} Any name of nevergrad's registry works "
                         f"({len(registry)} names), or optimizer=eep.")
    parametrization.random_state = np.random.RandomState(seed)
    return registry[name](parametrization=parametrization, budget=budget)


class NevergradProposer:
    """Any nevergrad optimiser; it minimises, so it is told ``-fitness``.

    Encodings that always give valid genomes: pruning, ``scores: float[G, E]`` -> each group keeps its ``E'``
    highest-scoring experts (per expert block with ``expert_groups`` > 1); merging, ``float[G, 2, E', E]`` around
    the best genome so far, ``W_RM`` clamped at 0.
    """

    def __init__(self, name: str, phase: str, template: Genome, seed: int, budget: int | None = None,
                 expert_groups: int = 1, sigma: float = 0.065):
        import nevergrad as ng

        self.phase, self.template, self.expert_groups = phase, template, expert_groups
        if phase == "prune":
            param = ng.p.Array(shape=(len(template.groups), template.num_experts))
        else:
            param = ng.p.Array(init=template.to_vector().numpy().astype(np.float64)).set_mutation(sigma=sigma)
        self.optimizer = nevergrad_optimizer(name, param, budget, seed)
        self.pending: dict[str, list] = {}

    def decode(self, value: np.ndarray) -> Genome:
        t = self.template
        if self.phase == "prune":
            return Genome.pruning([self._top(row) for row in np.asarray(value)], t.num_experts, t.top_k, t.groups)
        mats = torch.as_tensor(np.asarray(value), dtype=torch.float32).reshape(len(t.groups), 2, t.num_kept,
                                                                               t.num_experts)
        rm = mats[:, 0].clamp(min=0)
        _revive_empty_rows(rm, t.router_map)
        return Genome(rm, mats[:, 1], t.top_k, t.groups)

    def _top(self, scores: np.ndarray) -> list[int]:
        size = len(scores) // self.expert_groups
        per_block = self.template.num_kept // self.expert_groups
        return sorted(int(b * size + i) for b in range(self.expert_groups)
                      for i in np.argsort(-scores[b * size:(b + 1) * size], kind="stable")[:per_block])

    def ask(self) -> Genome:
        candidate = self.optimizer.ask()
        genome = self.decode(candidate.value)
        self.pending.setdefault(genome.content_hash(), []).append(candidate)
        return genome

    def tell(self, genome: Genome, fitness: float) -> None:
        for candidate in self.pending.pop(genome.content_hash(), []):
            self.optimizer.tell(candidate, -fitness)


def make_proposer(name: str, phase: str, archive: Archive, template: Genome, seed: int,
                  settings: EEPSettings | None = None, budget: int | None = None, expert_groups: int = 1):
    """``name='eep'`` for the EEP strategy, else a nevergrad registry name; ``template`` fixes shape and groups (for
    merging: the best genome so far, around which a nevergrad optimiser starts)."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}; choose one of {', '.join(PHASES)}")
    if name == "eep":
        if phase == "prune":
            return EEPPruning(archive, template.groups, template.num_experts, template.num_kept, template.top_k,
                              seed, settings, expert_groups)
        return EEPMerging(archive, seed, settings)
    return NevergradProposer(name, phase, template, seed, budget, expert_groups)
