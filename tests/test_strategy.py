"""The EEP strategy's operators: published rates, validity of children, crossover and selection."""
import random

import torch

from eep.genome import Genome
from eep.search.strategy import (EEPSettings, crossover, crossover_groups, mutate_matrices, mutate_subsets,
                                 parents, random_subsets)


def test_about_sixty_percent_of_pruning_children_equal_their_parent():
    """4 layer groups, E' = 4: P(unchanged) = (1 - 0.25 * (1 - 0.85 ** 4)) ** 4 = 0.60 (docs/methods.md section 3)."""
    rng, settings = random.Random(0), EEPSettings()
    parent = random_subsets(4, 8, 4, rng)
    same = sum(mutate_subsets(parent, 8, settings, rng) == parent for _ in range(4000)) / 4000
    assert abs(same - (1 - 0.25 * (1 - 0.85 ** 4)) ** 4) < 0.03


def test_pruning_children_stay_valid_subsets_and_respect_expert_groups():
    rng, settings = random.Random(1), EEPSettings(group_change=1.0, row_repoint=0.5)
    kept = random_subsets(3, 8, 4, rng, expert_groups=2)
    for _ in range(200):
        kept = mutate_subsets(kept, 8, settings, rng, expert_groups=2)
        for subset in kept:
            assert len(set(subset)) == 4 and sum(e < 4 for e in subset) == 2
    Genome.pruning(kept, 8, 2)  # valid genome


def test_merging_mutation_keeps_router_weights_non_negative():
    gen = torch.Generator().manual_seed(0)
    g = Genome.pruning([[0, 1, 2, 3]] * 4, 8, 2)
    changed = 0
    for _ in range(50):
        child = mutate_matrices(g, EEPSettings(), gen)
        assert (child.router_map >= 0).all()
        changed += child != g
        g = child
    assert changed > 20 and not g.is_pruning


def test_crossover_takes_whole_rows_from_either_parent():
    gen = torch.Generator().manual_seed(0)
    a = Genome.merging(torch.rand(2, 4, 8), torch.rand(2, 4, 8), 2)
    b = Genome.merging(torch.rand(2, 4, 8) + 1, torch.rand(2, 4, 8) + 1, 2)
    child = crossover(a, b, EEPSettings(), gen)
    from_a = (child.router_map == a.router_map).all(-1)
    assert torch.equal(from_a, (child.merge == a.merge).all(-1))
    assert torch.equal(~from_a, (child.router_map == b.router_map).all(-1))


def test_layer_group_crossover_takes_each_groups_subset_from_either_parent():
    rng = random.Random(0)
    a, b = [[0, 1, 2, 3]] * 6, [[4, 5, 6, 7]] * 6
    children = [crossover_groups(a, b, rng) for _ in range(200)]
    assert all(sub in (a[0], b[0]) for child in children for sub in child)
    from_a = sum(sub == a[0] for child in children for sub in child) / 1200
    assert 0.45 < from_a < 0.55   # each group from a with probability 1/2 (binomial s.d. 0.014)


def test_parents_are_the_near_best():
    gs = [Genome.pruning([[i, (i + 1) % 8]], 8, 1) for i in range(8)]
    archive = [(0.50, gs[0]), (0.80, gs[1]), (0.78, gs[2]), (0.70, gs[3]), (0.79, gs[4])]
    assert parents(archive, 0.03) == [gs[1], gs[4], gs[2]]
    assert parents(archive, 0.01, minimum=4) == [gs[1], gs[4], gs[2], gs[3]]


def test_the_shipped_config_holds_the_strategys_own_defaults():
    """One source for defaults: conf/search/default.yaml's ``eep:`` block is EEPSettings' defaults, key for key."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    import eep

    shipped = OmegaConf.to_container(OmegaConf.load(eep.conf_dir() / "search" / "default.yaml"))["eep"]
    assert shipped == asdict(EEPSettings())
