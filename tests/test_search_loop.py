"""The phase loop with every kind of proposer on synthetic fitness functions (no model): never twice, progress."""
import pytest
import torch

from eep.genome import Genome
from eep.search.loop import run_phase
import nevergrad as ng

from eep.search.proposers import Archive, Codec, EEPOptimizer, make_proposer
from eep.search.strategy import EEPSettings

GOOD = {0, 1, 2, 3}


def subset_fitness(genome: Genome) -> float:
    """Share of kept experts in GOOD, averaged over layers: 1.0 only for the GOOD subset everywhere."""
    return sum(len(GOOD & set(genome.kept(i))) for i in range(genome.num_layers)) / (4 * genome.num_layers)


@pytest.mark.parametrize("name", ["eep", "DiscreteOnePlusOne", "NGOpt", "TwoPointsDE"])
def test_pruning_phase_improves_and_never_evaluates_twice(name):
    archive, calls = Archive(), []
    template = Genome.pruning([[0, 1, 2, 3]] * 3, 8, 2)
    proposer = make_proposer(name, "prune", archive, template, seed=0,
                             settings=EEPSettings(population=10), budget=60)

    def evaluate(genome):
        calls.append(genome.content_hash())
        return subset_fitness(genome)

    assert run_phase(proposer, archive, evaluate, "prune", budget=60) == 60
    assert len(calls) == len(set(calls)) == archive.count("prune") == 60
    first = max(subset_fitness(g) for _, g in archive.scored()[:10])
    assert archive.best()[0] >= first and archive.best()[0] >= 0.75


def test_eep_pruning_respects_expert_groups():
    archive = Archive()
    template = Genome.pruning([[0, 1, 4, 5]] * 2, 8, 2)
    proposer = make_proposer("eep", "prune", archive, template, seed=1, expert_groups=2)
    run_phase(proposer, archive, subset_fitness, "prune", budget=40)
    for _, g in archive.scored():
        assert all(sum(e < 4 for e in g.kept(i)) == 2 for i in range(2))


@pytest.mark.parametrize("name", ["eep", "CMA", "NGOpt"])
def test_merging_phase_moves_towards_a_target(name):
    torch.manual_seed(0)
    target = torch.rand(2, 4, 8)

    def closeness(genome):
        return -float((genome.merge - target).abs().mean())

    archive = Archive()
    start = Genome.pruning([[0, 1, 2, 3]] * 2, 8, 2)
    archive.add(start, closeness(start), "prune")
    proposer = make_proposer(name, "merge", archive, start, seed=0, budget=80)
    run_phase(proposer, archive, closeness, "merge", budget=80)
    assert archive.count("merge") == 80
    assert archive.best()[0] > closeness(start)
    assert all((g.router_map >= 0).all() for _, g in archive.scored())


def test_exhausted_space_ends_the_phase():
    archive = Archive()
    template = Genome.pruning([[0, 1]], 3, 1)  # C(3, 2) = 3 subsets in all
    proposer = make_proposer("eep", "prune", archive, template, seed=0, settings=EEPSettings(population=2))
    proposer.optimizer.redraws = 20
    run_phase(proposer, archive, subset_fitness, "prune", budget=10, max_duplicates=50)
    assert archive.count("prune") == 3


def test_unknown_optimizer_suggests_close_names():
    with pytest.raises(ValueError, match="unknown nevergrad optimizer 'NGopt'. Close names: NGOpt"):
        make_proposer("NGopt", "prune", Archive(), Genome.pruning([[0, 1]], 4, 1), seed=0)


@pytest.mark.parametrize("phase", ["prune", "merge"])
def test_codec_round_trip(phase):
    template = Genome.pruning([[0, 1, 4, 5], [2, 3, 6, 7]], 8, 2)
    codec = Codec(phase, template, expert_groups=2)
    genome = template if phase == "prune" else Genome(template.router_map * 0.5, template.merge + 0.1, 2,
                                                      template.groups)
    assert codec.decode(codec.encode(genome)).content_hash() == genome.content_hash()
    assert codec.parametrization().value.size == codec.encode(genome).size


def test_eep_is_a_nevergrad_optimizer_driven_by_nevergrad_itself():
    """nevergrad's own ``minimize`` runs the EEP strategy (loss = -fitness) and recommends a good subset."""
    codec = Codec("prune", Genome.pruning([[0, 1, 2, 3]] * 3, 8, 2))
    optimizer = EEPOptimizer(codec.parametrization(), budget=80, codec=codec, settings=EEPSettings(population=10))
    assert isinstance(optimizer, ng.optimizers.base.Optimizer)
    best = optimizer.minimize(lambda scores: -subset_fitness(codec.decode(scores)))
    assert subset_fitness(codec.decode(best.value)) >= 0.75


@pytest.mark.parametrize("phase", ["prune", "merge"])
def test_eep_outstanding_asks_are_distinct(phase):
    """Several asks before any tell (a batch for parallel workers) never repeat a pending or told genome."""
    archive, start = Archive(), Genome.pruning([[0, 1, 2, 3]] * 2, 8, 2)
    archive.add(start, 0.5, "prune")
    proposer = make_proposer("eep", phase, archive, start, seed=0, settings=EEPSettings(population=4))
    for _ in range(3):
        batch = [proposer.ask() for _ in range(4)]
        hashes = [g.content_hash() for g in batch]
        assert len(set(hashes)) == 4 and not any(h in archive.entries for h in hashes)
        for g in batch:
            fitness = float(g.merge[:, :, :4].sum())
            archive.add(g, fitness, phase)
            proposer.tell(g, fitness)
