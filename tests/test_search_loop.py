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


class _Scripted:
    """A proposer that asks a fixed sequence of subsets and records every tell."""

    def __init__(self, subsets):
        self.queue = [Genome.pruning([s], 8, 1) for s in subsets]
        self.told = []

    def ask(self):
        return self.queue.pop(0)

    def tell(self, genome, fitness):
        self.told.append((genome.kept(0), fitness))


class _Reversed:
    """A pool whose results come back in the reverse order (as from workers that finish out of order)."""

    def __init__(self):
        self.batches = []

    def run(self, genomes, done):
        self.batches.append([g.kept(0) for g in genomes])
        for genome in reversed(genomes):
            done(genome, subset_fitness(genome))


def test_batches_are_committed_in_ask_order_whatever_order_results_arrive():
    """ask_batch=3: an archived genome is told at once; a repeat of a pending one joins the batch (evaluated once,
    told twice); results arriving in reverse order are added and told in ask order, as with a serial pool."""
    subsets = [[0, 1], [2, 3], [0, 1], [4, 5], [6, 7], [0, 2], [2, 3], [1, 3]]
    runs = []
    for pool in (None, _Reversed()):
        archive = Archive()
        archive.add(Genome.pruning([[6, 7]], 8, 1), 0.25, "prune")
        proposer = _Scripted(subsets)
        evaluated = run_phase(proposer, archive, pool or subset_fitness, "prune", budget=6, ask_batch=3)
        runs.append((evaluated, [g.kept(0) for _, g in archive.scored()], proposer.told))
    assert runs[0] == runs[1]
    evaluated, order, told = runs[0]
    assert evaluated == 5 and order == [[6, 7], [0, 1], [2, 3], [4, 5], [0, 2], [1, 3]]
    assert [kept for kept, _ in told] == [[0, 1], [2, 3], [0, 1], [4, 5],  # batch 1, committed in ask order
                                          [6, 7], [2, 3],  # archived when asked: told at once
                                          [0, 2], [1, 3]]  # batch 2 (the 2 left of the budget)
    assert told[4] == ([6, 7], 0.25) and told[0][1] == told[2][1] == 0.5
    assert pool.batches == [[[0, 1], [2, 3], [4, 5]], [[0, 2], [1, 3]]]


def test_eep_pruning_breeds_from_a_genome_already_in_the_archive():
    """A warm start: a good subset put in the archive before the phase is a parent from the first child on."""
    archive, good = Archive(), Genome.pruning([[0, 1, 2, 3]] * 2, 8, 2)
    archive.add(good, subset_fitness(good), "prune")
    proposer = make_proposer("eep", "prune", archive, good, seed=0,
                             settings=EEPSettings(population=1, group_change=1.0, row_repoint=0.25))
    assert list(proposer.optimizer.population) == [good.content_hash()]
    children = [proposer.ask() for _ in range(5)]
    assert all(len(GOOD & set(c.kept(0))) + len(GOOD & set(c.kept(1))) >= 4 for c in children)
    assert good.content_hash() not in {c.content_hash() for c in children}
