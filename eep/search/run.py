"""The search of a run folder: score candidates, log each evaluation once, checkpoint, stop on failing candidates.

Files it writes: ``eep_state.pkl`` (checkpoint after every batch of asks, evaluation and commit; the previous one
kept as ``.prev``), ``evaluations.jsonl`` (one row per distinct evaluation, in ask order) and ``best.json``. The
application layer (:mod:`eep.app.search`) owns the rest of the run folder.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from eep.errors import UserError
from eep.evaluate.score import WORST_FITNESS, Score
from eep.files import write_atomic
from eep.genome import Genome
from eep.search.state import SearchState, run_plan, save_checkpoint

log = logging.getLogger(__name__)
STATE, ROWS = "eep_state.pkl", "evaluations.jsonl"


class RowLog:
    """``evaluations.jsonl``: one row per distinct evaluation, appended once (rows of a resumed run are kept)."""

    def __init__(self, path: Path):
        self.path = path
        self.hashes = set()
        if path.exists():
            self.hashes = {json.loads(line)["genome_hash"] for line in path.read_text().splitlines() if line}

    def append(self, row: dict) -> None:
        if row["genome_hash"] in self.hashes:
            return
        self.hashes.add(row["genome_hash"])
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line] if self.path.exists() else []


Evaluation = Score  # the name checkpoints of eep 0.1.0 pickle their in-flight results under


def score(materializer, evaluator, genome: Genome) -> Score:
    """Apply ``genome`` and score the model on the search split (``seconds``: apply + score); an invalid candidate
    is contained like a failing one (:data:`WORST_FITNESS`, the reason in ``error``, ``applied=False``)."""
    start = time.perf_counter()
    try:
        materializer.apply(genome)
    except ValueError as err:
        return Score(WORST_FITNESS, error=str(err), applied=False)
    result = evaluator.evaluate()
    return Score(result.fitness, result.metrics, result.error, round(time.perf_counter() - start, 4),
                 forward_tokens=result.forward_tokens)


def row(genome: Genome, result: Score, phase: str) -> dict:
    """The ``evaluations.jsonl`` row of one evaluation (the genome itself unless the materialiser refused it)."""
    out = {"genome_hash": genome.content_hash(), "phase": phase, "fitness": result.fitness,
           "metrics": result.metrics, "seconds": result.seconds, "error": result.error,
           "forward_tokens": getattr(result, "forward_tokens", 0), "fidelity": getattr(result, "fidelity", 1.0)}
    return {**out, "genome": genome.to_dict()} if result.applied else out


def raised(result) -> bool:
    """Whether an evaluation (a :class:`Score`, or a bare fitness) failed by raising: :attr:`Score.raised`."""
    return isinstance(result, Score) and result.raised


class FailingCandidates(UserError):
    """``search.max_failed_candidates`` candidates in a row whose evaluation raised: the run stops, resumable."""


class _Failures:
    """Consecutive failed candidates (``raised``), counted in commit (ask) order."""

    def __init__(self, limit: int | None):
        self.limit, self.count, self.last = limit, 0, None

    def __call__(self, genome: Genome, result, phase: str) -> None:
        if raised(result):
            self.count, self.last = self.count + 1, str(result.error).splitlines()[0]
        else:
            self.count = 0

    @property
    def reached(self) -> bool:
        return self.limit is not None and self.count >= self.limit


def search(state: SearchState, pool, run_dir: Path, time_limit: float | None, on_evaluated=None,
           max_failed: int | None = None) -> SearchState:
    """Run (or go on with) the plan on ``pool`` (``eep.search.loop.SerialPool`` or ``eep.parallel.RayPool``),
    checkpointing into ``run_dir``; ``on_evaluated(genome, result, phase)`` per new genome, in ask order. After
    ``max_failed`` consecutive candidates whose evaluation raised, it stops after the batch's commit (the checkpoint
    intact) and raises :class:`FailingCandidates`."""
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)
    failures = _Failures(max_failed)

    def evaluated(genome, result, phase) -> None:
        failures(genome, result, phase)
        if on_evaluated is not None:
            on_evaluated(genome, result, phase)

    def stop() -> bool:
        return failures.reached or (deadline is not None and time.monotonic() > deadline)

    state = run_plan(state, pool, checkpoint=lambda s: save_checkpoint(s, run_dir / STATE), on_evaluated=evaluated,
                     stop=stop)
    if failures.reached and not state.finished:
        raise FailingCandidates(f"search.max_failed_candidates={max_failed}: the last {failures.count} candidates "
                                f"could not be evaluated (last error: {failures.last}); the search stopped with its "
                                f"checkpoint intact: fix the cause and resume with resume={run_dir}")
    return state


def write_best(run_dir: Path, fitness: float, genome: Genome) -> None:
    write_atomic(run_dir / "best.json", json.dumps({"genome_hash": genome.content_hash(), "fitness": fitness,
                                                     "genome": genome.to_dict()}, indent=1) + "\n")
