"""The EEP evolutionary strategy's operators (docs/methods.md section 3), as pure functions over genomes.

Pruning phase: a child re-points rows of its parent's kept subsets (each layer group changes with probability
``group_change``; in a changing group each row is re-pointed with probability ``row_repoint`` to an expert no other
row uses), or (with probability ``prune_crossover``, 0 in the paper) takes each layer group's subset from one of two
near-best parents (``crossover_groups``). Merging phase: Gaussian noise on both matrices, row-wise crossover of two
parents, occasional row renormalisation of ``W_EM``. Parents are drawn uniformly among archive members within
``parent_margin`` of the best.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eep.genome import Genome, subset_count


@dataclass
class EEPSettings:
    """The published probabilities and thresholds (fitness in lm-eval's 0-1 units), and two knobs beyond the paper."""

    population: int = 30            # random kept subsets that open the pruning phase
    group_change: float = 0.25      # probability that a layer group is changed in a child
    row_repoint: float = 0.15       # pruning: probability per row of re-pointing it
    parent_margin: float = 0.03     # parents: archive members within this of the best fitness
    crossover_margin: float = 0.01  # crossover parents: within this of the best ...
    crossover_min_parents: int = 6  # ... and at least the top this many
    crossover: float = 0.3          # merging: probability that a child is a crossover
    crossover_row: float = 0.6      # crossover: probability per row of taking the first parent's row
    noise: float = 0.25             # merging: probability per matrix entry of Gaussian noise
    noise_sigma: float = 0.065      # merging: noise scale
    renormalize: float = 0.1        # merging: probability that W_EM's rows are renormalised to sum to 1
    # beyond the paper (docs/methods.md section 3.2); search=paper sets 0.0 and None, the paper's strategy
    prune_crossover: float = 0.3    # pruning: probability that a child is a layer-group crossover of two parents
    seeded_random: int | None = 4   # random subsets drawn after a seeded first generation (None: up to population)


def pruning_space(template: Genome, expert_groups: int = 1) -> int:
    """How many distinct pruning genomes ``template``'s shape has: ``subset_count ** G``."""
    return subset_count(template.num_experts, template.num_kept, expert_groups) ** len(template.groups)


def random_subsets(groups: int, num_experts: int, num_kept: int, rng: random.Random,
                   expert_groups: int = 1) -> list[list[int]]:
    """A uniformly random kept subset per layer group; with ``expert_groups`` > 1 (DeepSeek), an equal number kept
    in every contiguous block of ``num_experts / expert_groups`` experts."""
    per_block, size = num_kept // expert_groups, num_experts // expert_groups
    return [sorted(b * size + e for b in range(expert_groups) for e in rng.sample(range(size), per_block))
            for _ in range(groups)]


def mutate_subsets(kept: Sequence[Sequence[int]], num_experts: int, settings: EEPSettings, rng: random.Random,
                   expert_groups: int = 1) -> list[list[int]]:
    """Re-point rows to unused experts (within the row's expert block when ``expert_groups`` > 1)."""
    size = num_experts // expert_groups
    out = []
    for subset in kept:
        subset = list(subset)
        if rng.random() < settings.group_change:
            for row in range(len(subset)):
                if rng.random() < settings.row_repoint:
                    block = subset[row] // size
                    free = [e for e in range(block * size, (block + 1) * size) if e not in subset]
                    if free:
                        subset[row] = rng.choice(free)
        out.append(sorted(subset))
    return out


def mutate_matrices(genome: Genome, settings: EEPSettings, gen: torch.Generator) -> Genome:
    """Gaussian noise ``N(0, 1) * noise_sigma`` on entries (probability ``noise``) of both matrices of changing
    groups; ``W_RM`` is kept non-negative; with probability ``renormalize`` the rows of ``W_EM`` sum to 1."""
    rm, em = genome.router_map.clone(), genome.merge.clone()
    for g in range(len(genome.groups)):
        if torch.rand((), generator=gen) >= settings.group_change:
            continue
        for mat in (rm, em):
            hit = torch.rand(mat[g].shape, generator=gen) < settings.noise
            mat[g] += hit * torch.randn(mat[g].shape, generator=gen) * settings.noise_sigma
        rm[g].clamp_(min=0)
        if torch.rand((), generator=gen) < settings.renormalize:
            sums = em[g].sum(dim=1, keepdim=True)
            em[g] = torch.where(sums != 0, em[g] / sums, em[g])
    revive_empty_rows(rm, genome.router_map)
    return genome.with_matrices(rm, em)


def revive_empty_rows(rm: torch.Tensor, parent: torch.Tensor) -> None:
    """A router row clamped to all zeros would route nothing: give it back its parent's row."""
    empty = rm.sum(dim=2) == 0
    rm[empty] = parent[empty]


def crossover_groups(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], rng: random.Random) -> list[list[int]]:
    """Layer-group crossover of two pruning parents' kept subsets (``[G][E']`` expert indices): each group's subset
    is ``a``'s or ``b``'s with probability 1/2, so a child can join one statistic's choice in some layers with
    another's in the others."""
    return [sorted(x if rng.random() < 0.5 else y) for x, y in zip(a, b, strict=True)]


def crossover(a: Genome, b: Genome, settings: EEPSettings, gen: torch.Generator) -> Genome:
    """Row-wise crossover: each (W_RM row, W_EM row) pair from ``a`` with probability ``crossover_row``, else ``b``."""
    take_a = (torch.rand(a.router_map.shape[:2], generator=gen) < settings.crossover_row)[..., None]
    return a.with_matrices(torch.where(take_a, a.router_map, b.router_map), torch.where(take_a, a.merge, b.merge))


def parents(archive: Sequence[tuple[float, Genome]], margin: float, minimum: int = 1) -> list[Genome]:
    """Archive members within ``margin`` of the best fitness, at least the top ``minimum`` (archive order kept)."""
    ranked = sorted(archive, key=lambda item: -item[0])
    best = ranked[0][0]
    near = [g for f, g in ranked if f >= best - margin]
    return near if len(near) >= minimum else [g for _, g in ranked[:minimum]]
