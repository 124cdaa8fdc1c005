"""Sources of candidates for one search phase: nevergrad optimisers over one genome encoding, the EEP strategy
(``EEPOptimizer``, a nevergrad optimiser of eep's own) or any nevergrad registry optimiser.

A proposer ``ask()``s a genome and is ``tell()``-ed its fitness (maximised; the optimiser is told ``-fitness``).
Several asks may be outstanding before their tells. The archive of evaluated genomes is shared by the phases; a
proposer that asks a genome already in the archive is told its recorded fitness instead of evaluating it again (the
EEP strategy re-draws such children itself).
"""
from __future__ import annotations

import difflib
import random

import nevergrad as ng
import numpy as np
import torch

from eep.genome import Genome
from eep.search.archive import Archive  # kept here too: eep 0.1.0 checkpoints pickle this path
from eep.search.strategy import (EEPSettings, crossover, crossover_groups, mutate_matrices, mutate_subsets,
                                 parents, random_subsets, revive_empty_rows)

PHASES = ("prune", "merge")


class Codec:
    """The nevergrad value of a phase's genomes; every value decodes to a valid genome.

    Pruning: ``scores: float[G, E]``, each layer group keeps its ``E'`` highest-scoring experts (the same number in
    each of ``expert_groups`` contiguous blocks, for DeepSeek). Merging: ``float[G * 2 * E' * E]``, the flattened
    ``(W_RM, W_EM)`` pairs, ``W_RM`` clamped at 0 (a row clamped to all zeros takes the template's row back).
    ``template`` fixes shapes, groups and ``top_k'`` (for merging, the start point).
    """

    def __init__(self, phase: str, template: Genome, expert_groups: int = 1):
        self.phase, self.template, self.expert_groups = phase, template, expert_groups

    def parametrization(self, sigma: float = 0.065):
        t = self.template
        if self.phase == "prune":
            return ng.p.Array(shape=(len(t.groups), t.num_experts))
        return ng.p.Array(init=t.to_vector().numpy().astype(np.float64)).set_mutation(sigma=sigma)

    def encode(self, genome: Genome) -> np.ndarray:
        """A value that decodes to ``genome`` (pruning: 1 at the kept experts, 0 elsewhere)."""
        if self.phase == "merge":
            return genome.to_vector().numpy().astype(np.float64)
        scores = np.zeros((len(genome.groups), genome.num_experts))
        for row, group in enumerate(genome.groups):
            scores[row, genome.kept(group[0])] = 1.0
        return scores

    def decode(self, value) -> Genome:
        t = self.template
        if self.phase == "prune":
            return Genome.pruning([self._top(row) for row in np.asarray(value)], t.num_experts, t.top_k, t.groups)
        mats = torch.as_tensor(np.asarray(value), dtype=torch.float32).reshape(len(t.groups), 2, t.num_kept,
                                                                               t.num_experts)
        rm = mats[:, 0].clamp(min=0)
        revive_empty_rows(rm, t.router_map)
        return t.with_matrices(rm, mats[:, 1])

    def _top(self, scores: np.ndarray) -> list[int]:
        size = len(scores) // self.expert_groups
        per_block = self.template.num_kept // self.expert_groups
        return sorted(int(b * size + i) for b in range(self.expert_groups)
                      for i in np.argsort(-scores[b * size:(b + 1) * size], kind="stable")[:per_block])


class EEPOptimizer(ng.optimizers.base.Optimizer):
    """The EEP evolutionary strategy (docs/methods.md section 3) as a nevergrad optimiser over a ``Codec``'s
    parametrization. Steady state: every told candidate joins the population (by content hash), parents are drawn
    among its near-best members; a child equal to a told or pending genome is re-drawn (up to ``redraws`` times).

    Pruning phase: an opening of random subsets, then re-pointing mutations and (``prune_crossover``) layer-group
    crossovers of near-best members. The opening is ``settings.population`` random draws, or ``seeded_random`` draws
    when the population was told seeds before the first ask (``search.init_from``); draws are counted, not fully
    scored members, so candidates cut by racing do not prolong it. Merging phase: Gaussian noise or row crossover of
    near-best members; the population is opened by telling it the archive (``tell`` of candidates it did not ask,
    nevergrad's warm-start path).
    """

    def __init__(self, parametrization, budget: int | None = None, num_workers: int = 1, *, codec: Codec,
                 settings: EEPSettings | None = None, seed: int = 0, redraws: int = 1000):
        super().__init__(parametrization, budget=budget, num_workers=num_workers)
        self.codec, self.settings, self.redraws = codec, settings or EEPSettings(), redraws
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.population: dict[str, tuple[float, Genome]] = {}
        self.pending: set[str] = set()
        self.excluded: set[str] = set()
        self.opening: int | None = None   # random draws of the opening, fixed at the first pruning ask
        self.opened = 0                   # random draws made so far

    excluded: set | None = None   # class default: optimisers pickled before racing existed exclude nothing
    opened: int | None = None     # class default: optimisers pickled before it count fully scored members

    def exclude(self, key: str) -> None:
        """Keep genome ``key`` (scored on a slice only) out of the population: never a parent."""
        self.excluded = (self.excluded or set()) | {key}
        self.population.pop(key, None)

    def _internal_ask_candidate(self):
        for _ in range(self.redraws):
            genome, opening = self._draw()
            key = genome.content_hash()
            if key not in self.population and key not in self.pending and key not in (self.excluded or ()):
                break  # else: the reachable space is exhausted and the loop reuses the recorded fitness
        if opening and self.opened is not None:
            self.opened += 1
        self.pending.add(key)
        return self.parametrization.spawn_child(new_value=self.codec.encode(genome))

    def _internal_tell_candidate(self, candidate, loss: float) -> None:
        genome = self.codec.decode(candidate.value)
        self.pending.discard(genome.content_hash())
        if genome.content_hash() not in (self.excluded or ()):
            self.population.setdefault(genome.content_hash(), (-loss, genome))

    def _draw(self) -> tuple[Genome, bool]:
        """A child, and whether it is a random subset of the pruning phase's opening."""
        if self.codec.phase == "prune" and self._opening():
            t = self.codec.template
            kept = random_subsets(len(t.groups), t.num_experts, t.num_kept, self.rng, self.codec.expert_groups)
            return Genome.pruning(kept, t.num_experts, t.top_k, t.groups), True
        return (self._draw_pruning() if self.codec.phase == "prune" else self._draw_merging()), False

    def _draw_pruning(self) -> Genome:
        """A re-pointing mutation of a near-best member, or (``prune_crossover``) a layer-group crossover of two."""
        t, s, blocks = self.codec.template, self.settings, self.codec.expert_groups
        # an optimiser pickled before these knobs (opened None) keeps the paper's rule it was started with
        share = 0.0 if self.opened is None else s.prune_crossover
        scored = list(self.population.values())
        pool = parents(scored, s.crossover_margin, s.crossover_min_parents) if share > 0 else []
        if len(pool) >= 2 and self.rng.random() < share:   # the paper (share 0) draws no number here
            a, b = self.rng.sample(pool, 2)
            kept = crossover_groups(*([p.kept(g[0]) for g in t.groups] for p in (a, b)), self.rng)
        else:
            parent = self.rng.choice(parents(scored, s.parent_margin))
            kept = mutate_subsets([parent.kept(g[0]) for g in t.groups], t.num_experts, s, self.rng, blocks)
        return Genome.pruning(kept, t.num_experts, t.top_k, t.groups)

    def _opening(self) -> bool:
        """Whether the next pruning draw is a random subset of the opening: fewer than ``opening`` accepted so far
        (or nothing fully scored yet to mutate)."""
        s = self.settings
        if self.opened is None:   # pickled before draws were counted: the rule it was started with
            return len(self.population) < s.population
        if self.opening is None:
            seeded = s.seeded_random is not None and len(self.population) > 0
            self.opening = s.seeded_random if seeded else s.population
        return self.opened < self.opening or not self.population

    def _draw_merging(self) -> Genome:
        s, scored = self.settings, list(self.population.values())
        if self.rng.random() < s.crossover:
            pool = parents(scored, s.crossover_margin, s.crossover_min_parents)
            if len(pool) >= 2:
                a, b = self.rng.sample(pool, 2)
                return crossover(a, b, s, self.gen)
        return mutate_matrices(self.rng.choice(parents(scored, s.parent_margin)), s, self.gen)


def nevergrad_optimizer(name: str, parametrization, budget: int | None, seed: int):
    """The registry optimiser ``name`` (an unknown name is a ValueError that suggests close names)."""
    registry = ng.optimizers.registry
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown nevergrad optimizer {name!r}.{hint} Any name of nevergrad's registry works "
                         f"({len(registry)} names), or optimizer=eep.")
    parametrization.random_state = np.random.RandomState(seed)
    return registry[name](parametrization=parametrization, budget=budget)


class NevergradProposer:
    """A nevergrad optimiser behind ask/tell of genomes: it minimises, so it is told ``-fitness``; every pending
    candidate that decoded to a genome is told when that genome's fitness is known."""

    def __init__(self, optimizer, codec: Codec):
        self.optimizer, self.codec = optimizer, codec
        self.pending: dict[str, list] = {}

    def ask(self) -> Genome:
        candidate = self.optimizer.ask()
        genome = self.codec.decode(candidate.value)
        self.pending.setdefault(genome.content_hash(), []).append(candidate)
        return genome

    def tell(self, genome: Genome, fitness: float, full: bool = True) -> None:
        """Tell every pending ask of ``genome`` ``-fitness``; ``full=False`` (cut by racing): the EEP strategy also
        keeps it out of its population, so it is never a parent."""
        if not full and hasattr(self.optimizer, "exclude"):
            self.optimizer.exclude(genome.content_hash())
        for candidate in self.pending.pop(genome.content_hash(), []):
            self.optimizer.tell(candidate, -fitness)

    def seed(self, scored) -> None:
        """Tell ``(fitness, genome)`` pairs the optimiser did not ask (a warm start)."""
        for fitness, genome in scored:
            candidate = self.optimizer.parametrization.spawn_child(new_value=self.codec.encode(genome))
            self.optimizer.tell(candidate, -fitness)


def make_proposer(name: str, phase: str, archive: Archive, template: Genome, seed: int,
                  settings: EEPSettings | None = None, budget: int | None = None,
                  expert_groups: int = 1) -> NevergradProposer:
    """``name='eep'`` for the EEP strategy, else a nevergrad registry name; ``template`` fixes shape and groups (for
    merging: the best genome so far, around which a registry optimiser starts). Every optimiser is told the pruning
    phase's genomes already in the archive (the seeded first generation, ``search.init_from``; nevergrad's
    tell-not-asked warm start); the EEP strategy's merging phase is told all of it."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}; choose one of {', '.join(PHASES)}")
    codec = Codec(phase, template, expert_groups)
    param = codec.parametrization()
    if name != "eep":
        proposer = NevergradProposer(nevergrad_optimizer(name, param, budget, seed), codec)
        if phase == "prune":
            proposer.seed(archive.scored("prune"))
        return proposer
    proposer = NevergradProposer(EEPOptimizer(param, codec=codec, settings=settings, seed=seed), codec)
    proposer.seed(archive.scored(None if phase == "merge" else "prune"))
    return proposer
