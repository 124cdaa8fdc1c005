"""Search state that survives a kill: the phase plan's progress, the archive, the live proposer and the batch in
progress (its asks and the results back so far), checkpointed atomically after the asks, after every evaluation and
after every commit (see ``eep.search.loop``), so a resumed run evaluates and asks exactly the genomes an
uninterrupted one would."""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eep.genome import Genome
from eep.search.loop import Batch, Racing, run_phase
from eep.search.archive import Archive
from eep.search.proposers import make_proposer
from eep.search.strategy import EEPSettings, pruning_space

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
    """Everything a search needs to go on: the plan, where it is, the archive, the current phase's proposer, the
    batch in progress and ``ask_batch`` (fixed when the run starts, so a resume with another worker count asks the
    same batches)."""

    plan: tuple[Phase, ...]
    template: Genome                      # shape, layer groups and top-k' of the candidates
    seed: int
    settings: EEPSettings = field(default_factory=EEPSettings)
    expert_groups: int = 1
    archive: Archive = field(default_factory=Archive)
    phase_index: int = 0
    proposer: object | None = None
    finished: bool = False
    ask_batch: int = 1
    batch: Batch | None = None
    extra: dict = field(default_factory=dict)   # what the caller needs on resume (config, hashes, versions)
    racing: Racing | None = None                # multi-fidelity scoring (None: every candidate scored fully)
    gate_rows: bool = False                     # merging genomes map the gate rows (search.merge_router=gate_rows)


def start_phase(state: SearchState) -> None:
    """Create the proposer of the current phase (merging starts around the best genome so far, its ``W_RM`` on the
    probabilities or, ``state.gate_rows``, on the gate rows)."""
    phase = state.plan[state.phase_index]
    template = state.archive.best()[1] if phase.name == "merge" and state.archive.entries else state.template
    if phase.name == "merge":
        template = template.with_gate_rows(state.gate_rows)
    state.proposer = make_proposer(phase.optimizer, phase.name, state.archive, template,
                                   seed=state.seed * 1000 + state.phase_index, settings=state.settings,
                                   budget=phase.budget, expert_groups=state.expert_groups)


def run_plan(state: SearchState, evaluate,
             checkpoint: Callable[[SearchState], None] | None = None,
             on_evaluated: Callable[[Genome, object, str], None] | None = None,
             stop: Callable[[], bool] | None = None) -> SearchState:
    """Run the remaining phases in batches of ``state.ask_batch`` (a pending batch first), checkpointing as
    ``eep.search.loop`` describes; ``evaluate`` is ``genome -> fitness`` (or a result with ``.fitness``) or a pool.
    ``on_evaluated(genome, result, phase)`` is called per new genome, in ask order. ``stop()`` true ends the run
    early between batches (time limit) and leaves it resumable."""
    state.batch = state.batch or Batch()
    while state.phase_index < len(state.plan):
        phase = state.plan[state.phase_index]
        if phase.budget > 0:
            if state.proposer is None:
                start_phase(state)

            def after(genome: Genome, result, phase_name: str = phase.name) -> None:
                if on_evaluated is not None:
                    on_evaluated(genome, result, phase_name)

            budget = phase.budget if phase.name != "prune" else min(phase.budget, pruning_space(
                state.template, state.expert_groups))   # e.g. 8 of 8 experts (k' < k only): one genome in all
            run_phase(state.proposer, state.archive, evaluate, phase.name, budget, after, stop=stop,
                      ask_batch=state.ask_batch, batch=state.batch,
                      checkpoint=None if checkpoint is None else lambda: checkpoint(state), racing=state.racing)
            if stop is not None and stop() and state.archive.count(phase.name) < budget:
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
