"""Exact resume: a search killed mid-candidate and resumed from its checkpoint asks the same genomes."""
import pickle

import pytest
import torch

from eep.genome import Genome
from eep.search.state import Phase, SearchState, load_checkpoint, run_plan, save_checkpoint
from eep.search.strategy import EEPSettings

TARGET = torch.rand(2, 4, 8, generator=torch.Generator().manual_seed(0))


def fitness(genome: Genome) -> float:
    kept = [set(genome.kept(i) or []) for i in range(genome.num_layers)]
    return sum(len({0, 1, 2, 3} & k) for k in kept) / 8 - float((genome.merge - TARGET).abs().mean()) / 10


def new_state(prune: str, merge: str, ask_batch: int = 1) -> SearchState:
    return SearchState(plan=(Phase("prune", prune, 25), Phase("merge", merge, 15)),
                       template=Genome.pruning([[0, 1, 2, 3]] * 2, 8, 2), seed=7,
                       settings=EEPSettings(population=8), ask_batch=ask_batch)


class Killed(Exception):
    pass


@pytest.mark.parametrize("prune, merge", [("eep", "eep"), ("NGOpt", "CMA")])
def test_resume_after_a_kill_repeats_the_uninterrupted_run(tmp_path, prune, merge):
    order = []
    full = run_plan(new_state(prune, merge), lambda g: order.append(g.content_hash()) or fitness(g))
    assert full.finished and len(order) == len(set(order)) == 40

    seen, path = [], tmp_path / "state.pkl"

    def dying(genome):
        if len(seen) == 31:  # killed while evaluating the 32nd candidate (in the merging phase)
            raise Killed
        seen.append(genome.content_hash())
        return fitness(genome)

    with pytest.raises(Killed):
        run_plan(new_state(prune, merge), dying, checkpoint=lambda s: save_checkpoint(s, path))
    state = load_checkpoint(path)
    assert state.archive.count("prune") == 25 and state.archive.count("merge") == 6
    resumed = run_plan(state, lambda g: seen.append(g.content_hash()) or fitness(g),
                       checkpoint=lambda s: save_checkpoint(s, path))
    assert seen == order
    assert resumed.archive.best()[1] == full.archive.best()[1]
    assert load_checkpoint(path).finished


@pytest.mark.parametrize("prune, merge", [("eep", "eep"), ("NGOpt", "CMA")])
def test_resume_mid_batch_evaluates_the_pending_asks_and_repeats_the_uninterrupted_run(tmp_path, prune, merge):
    """ask_batch=2, killed while evaluating the second genome of a batch whose first result is back: the checkpoint
    holds both asks and that result; the resumed run evaluates only the missing one and then goes on as before."""
    order = []
    full = run_plan(new_state(prune, merge, 2), lambda g: order.append(g.content_hash()) or fitness(g))
    assert full.finished and len(order) == len(set(order)) == 40

    seen, path = [], tmp_path / "state.pkl"

    def dying(genome):
        if len(seen) == 32:  # the 33rd evaluation: prune 12 x 2 + 1, merge 26-27, ..., 32-33: second of a batch
            raise Killed
        seen.append(genome.content_hash())
        return fitness(genome)

    with pytest.raises(Killed):
        run_plan(new_state(prune, merge, 2), dying, checkpoint=lambda s: save_checkpoint(s, path))
    state = load_checkpoint(path)
    assert state.archive.count("merge") == 6 and len(state.batch.asks) == 2
    assert list(state.batch.results) == [seen[-1]] and state.batch.asks[0].content_hash() == seen[-1]
    resumed = run_plan(state, lambda g: seen.append(g.content_hash()) or fitness(g),
                       checkpoint=lambda s: save_checkpoint(s, path))
    assert seen == order
    assert list(resumed.archive.entries) == list(full.archive.entries)
    assert resumed.archive.best()[1] == full.archive.best()[1]


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    path = tmp_path / "state.pkl"
    state = new_state("eep", "eep")
    stop_after = iter(range(100))
    run_plan(state, fitness, checkpoint=lambda s: save_checkpoint(s, path), stop=lambda: next(stop_after) >= 5)
    good = load_checkpoint(path).archive.count("prune")
    path.write_bytes(path.read_bytes()[:40])
    assert load_checkpoint(path).archive.count("prune") == good - 1
    with pytest.raises(FileNotFoundError, match="no search checkpoint"):
        load_checkpoint(tmp_path / "missing.pkl")


def test_a_zero_budget_skips_the_phase():
    state = SearchState(plan=(Phase("prune", "eep", 0), Phase("merge", "eep", 5)),
                        template=Genome.pruning([[0, 1, 2, 3]] * 2, 8, 2), seed=1)
    state.archive.add(state.template, fitness(state.template), "prune")
    run_plan(state, fitness)
    assert state.archive.count("merge") == 5 and state.finished


def test_a_checkpoint_of_eep_0_1_0_resumes_through_the_old_class_paths(tmp_path):
    """eep 0.1.0 pickled its archive as ``eep.search.proposers.Archive`` and in-flight results as
    ``eep.search.run.Evaluation``; both paths still load, into today's classes, and the run goes on exactly."""
    from eep.evaluate.score import Score
    from eep.search.archive import Archive

    order = []
    full = run_plan(new_state("eep", "eep"), lambda g: order.append(g.content_hash()) or fitness(g))
    seen, path = [], tmp_path / "state.pkl"

    def dying(genome):
        if len(seen) == 12:
            raise Killed
        seen.append(genome.content_hash())
        return Score(fitness(genome))

    moved = {Archive: ("eep.search.proposers", "Archive"), Score: ("eep.search.run", "Evaluation")}
    saved = {cls: (cls.__module__, cls.__qualname__) for cls in moved}
    try:  # checkpoints written as eep 0.1.0 wrote them: its module paths
        for cls, (module, name) in moved.items():
            cls.__module__, cls.__qualname__ = module, name
        with pytest.raises(Killed):
            run_plan(new_state("eep", "eep"), dying, checkpoint=lambda s: save_checkpoint(s, path))
        raw, result = path.read_bytes(), pickle.dumps(Score(0.5, {"t": {"acc": 0.5}}, "x", 1.0))
    finally:
        for cls, (module, name) in saved.items():
            cls.__module__, cls.__qualname__ = module, name
    assert b"eep.search.proposers" in raw and b"Archive" in raw and b"eep.search.archive" not in raw
    assert b"Evaluation" in result and pickle.loads(result) == Score(0.5, {"t": {"acc": 0.5}}, "x", 1.0)
    state = load_checkpoint(path)
    assert type(state.archive) is Archive
    resumed = run_plan(state, lambda g: seen.append(g.content_hash()) or fitness(g))
    assert seen == order and resumed.archive.best()[1].content_hash() == full.archive.best()[1].content_hash()
