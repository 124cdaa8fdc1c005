"""Search state that survives a kill: the phase plan's progress, the archive and the live proposer, checkpointed
atomically after every evaluation, so a resumed run asks exactly the genomes an uninterrupted one would."""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eep.genome import Genome
from eep.search.loop import run_phase
from eep.search.proposers import Archive, make_proposer
from eep.search.strategy import EEPSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """One phase of the plan: ``name`` (prune or merge), the optimiser (``eep`` or a nevergrad name), the budget of
    distinct evaluations (0 skips the phase)."""

    name: str
    optimizer: str
    budget: int


@dataclass
class SearchState:
    """Everything a search needs to go on: the plan, where it is, the archive and the current phase's proposer."""

    plan: tuple[Phase, ...]
    template: Genome                      # shape, layer groups and top-k' of the candidates
    seed: int
    settings: EEPSettings = field(default_factory=EEPSettings)
    expert_groups: int = 1
    archive: Archive = field(default_factory=Archive)
    phase_index: int = 0
    proposer: object | None = None
    finished: bool = False
    extra: dict = field(default_factory=dict)   # what the caller needs on resume (config, hashes, versions)


def start_phase(state: SearchState) -> None:
    """Create the proposer of the current phase (merging starts around the best genome so far)."""
    phase = state.plan[state.phase_index]
    template = state.archive.best()[1] if phase.name == "merge" and state.archive.entries else state.template
    state.proposer = make_proposer(phase.optimizer, phase.name, state.archive, template,
                                   seed=state.seed * 1000 + state.phase_index, settings=state.settings,
                                   budget=phase.budget, expert_groups=state.expert_groups)


def run_plan(state: SearchState, evaluate: Callable[[Genome], float],
             checkpoint: Callable[[SearchState], None] | None = None,
             on_evaluated: Callable[[Genome, float, str], None] | None = None,
             stop: Callable[[], bool] | None = None) -> SearchState:
    """Run the remaining phases, checkpointing after every evaluation; ``stop()`` true ends the run early (time
    limit) and leaves it resumable."""
    while state.phase_index < len(state.plan):
        phase = state.plan[state.phase_index]
        if phase.budget > 0:
            if state.proposer is None:
                start_phase(state)

            def after(genome: Genome, fitness: float, phase_name: str = phase.name) -> None:
                if on_evaluated is not None:
                    on_evaluated(genome, fitness, phase_name)
                if checkpoint is not None:
                    checkpoint(state)

            run_phase(state.proposer, state.archive, evaluate, phase.name, phase.budget, after, stop=stop)
            if stop is not None and stop() and state.archive.count(phase.name) < phase.budget:
                return state
        state.phase_index += 1
        state.proposer = None
    state.finished = True
    if checkpoint is not None:
        checkpoint(state)
    return state


def save_checkpoint(state: SearchState, path: Path) -> None:
    """Write ``state`` atomically: a temporary file, fsync, then rename over ``path``; the previous one is kept as
    ``path.prev`` so that a file truncated by a crash mid-write still leaves a good checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> SearchState:
    """The newest readable checkpoint (``path``, else ``path.prev``), or a FileNotFoundError/ValueError that says
    what was wrong."""
    path = Path(path)
    candidates = [p for p in (path, path.with_name(path.name + ".prev")) if p.exists()]
    if not candidates:
        raise FileNotFoundError(f"no search checkpoint at {path}: is this a run folder of eep-search?")
    for candidate in candidates:
        try:
            with open(candidate, "rb") as f:
                state = pickle.load(f)
            if not isinstance(state, SearchState):
                raise ValueError("not a SearchState")
            if candidate != path:
                log.warning("checkpoint %s is unreadable; resuming from the previous one, %s", path, candidate)
            return state
        except (EOFError, pickle.UnpicklingError, ValueError, AttributeError) as err:
            log.warning("checkpoint %s is corrupt (%s)", candidate, err)
    raise ValueError(f"every checkpoint in {path.parent} is corrupt; the run cannot be resumed")
