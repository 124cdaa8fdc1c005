"""One eep-search run: validate the config, search on the search split, pick on validation, report on test, export.

Files in the run folder: ``eep_config.yaml`` (the run's own config; Hydra rewrites ``.hydra/``), ``eep_state.pkl``
(checkpoint after every batch of asks, evaluation and commit), ``evaluations.jsonl`` (one row per distinct evaluation,
in ask order), ``best.json``,
``report.json``, ``report.md``, ``curve.png`` and ``model/`` (the exported checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eep.files import write_atomic
from eep.genome import Genome
from eep.search.state import Phase, SearchState, load_checkpoint, run_plan, save_checkpoint
from eep.search.strategy import EEPSettings
from eep.settings import UserError, check_parallel, check_settings  # noqa: F401 - re-exported

log = logging.getLogger(__name__)
STATE, CONFIG, ROWS = "eep_state.pkl", "eep_config.yaml", "evaluations.jsonl"
VERSIONED = ("eep", "torch", "transformers", "lm_eval", "nevergrad", "hydra-core")


NOT_HASHED = ("workers", "ray_address")  # evaluator keys that do not change which genomes a run evaluates
NOT_HASHED_SEARCH = ("max_failed_candidates",)  # nor does when a failing run stops (it may be raised on resume)
NOT_HASHED_TOP = ("resume", "resume_force", "verbose")  # nor where it resumes from, nor how much it prints
RESUME_KEYS = ("resume", "resume_force")


def config_hash(cfg: DictConfig) -> str:
    """Hash of the run-defining config (``resume``, ``resume_force``, ``verbose``, ``evaluator.workers`` and
    ``evaluator.ray_address`` excluded: a run may be resumed on another pool, its ``ask_batch`` is in its state;
    ``search.max_failed_candidates`` too)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in data.items() if k not in NOT_HASHED_TOP}
    if isinstance(data.get("evaluator"), dict):
        data["evaluator"] = {k: v for k, v in data["evaluator"].items() if k not in NOT_HASHED}
    if isinstance(data.get("search"), dict):
        data["search"] = {k: v for k, v in data["search"].items() if k not in NOT_HASHED_SEARCH}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing distribution is recorded, not fatal
            out[name] = "unknown"
    return out


def new_state(cfg: DictConfig, template: Genome, expert_groups: int) -> SearchState:
    plan = (Phase("prune", cfg.optimizer.prune_name, cfg.search.prune_budget),
            Phase("merge", cfg.optimizer.merge_name, cfg.search.merge_budget))
    settings = EEPSettings(**OmegaConf.to_container(cfg.search.eep))
    return SearchState(plan=plan, template=template, seed=cfg.seed, settings=settings, expert_groups=expert_groups,
                       ask_batch=check_parallel(cfg)[0],
                       extra={"config_hash": config_hash(cfg), "versions": package_versions()})


def resumed_config(cfg: DictConfig, saved: DictConfig, overrides: list[str]) -> DictConfig:
    """The config a resumed run goes on with: its ``saved`` config with the command line's ``overrides`` (other
    than the resume keys) applied; with a config-group selection among them (``model=...``, ``+experiment=...``)
    the freshly composed ``cfg`` stands. The caller checks the result against the run's hash."""
    extra = [o for o in overrides if o.split("=")[0] not in RESUME_KEYS]
    keys = [o.split("=")[0].lstrip("+~") for o in extra]
    if all("." in k or (k in saved and not OmegaConf.is_dict(saved[k])) for k in keys):
        merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(extra)) if extra else saved
    else:
        merged = OmegaConf.create(OmegaConf.to_container(cfg))
    merged.resume, merged.resume_force = cfg.resume, cfg.resume_force
    return merged


def resume_state(run_dir: Path, cfg: DictConfig, force: bool) -> SearchState:
    """The run's checkpoint; a changed config is a UserError unless ``force``."""
    state = load_checkpoint(run_dir / STATE)
    if state.extra.get("config_hash") != config_hash(cfg) and not force:
        raise UserError(f"the config differs from the one {run_dir} was started with; resume with no other "
                        f"argument, or add resume_force=true to accept the change")
    return state


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


@dataclass
class Evaluation:
    """One candidate's result on the search split, as a worker returns it: ``fitness`` (-1 for a failed candidate),
    ``metrics`` ``{task: {metric: value}}``, ``seconds`` (apply + score), ``error`` (None, or why it failed) and
    ``applied`` (False if the materialiser refused the genome)."""

    fitness: float
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    applied: bool = True


def score(materializer, evaluator, genome: Genome) -> Evaluation:
    """Apply ``genome`` and score the model on the search split; an invalid candidate is contained like a failing
    one (fitness -1, the reason in ``error``)."""
    start = time.perf_counter()
    try:
        materializer.apply(genome)
    except ValueError as err:
        return Evaluation(-1.0, error=str(err), applied=False)
    result = evaluator.evaluate()
    return Evaluation(result.fitness, result.metrics, round(time.perf_counter() - start, 4), result.error)


def row(genome: Genome, result: Evaluation, phase: str) -> dict:
    """The ``evaluations.jsonl`` row of one evaluation (the genome itself unless the materialiser refused it)."""
    out = {"genome_hash": genome.content_hash(), "phase": phase, "fitness": result.fitness,
           "metrics": result.metrics, "seconds": result.seconds, "error": result.error}
    return {**out, "genome": genome.to_dict()} if result.applied else out


def raised(result) -> bool:
    """Whether an evaluation failed by raising (or the materialiser refused the genome); a candidate with NaN/inf
    logits (``non-finite ...``, which merging can legitimately produce) is a scored candidate, not a failure."""
    error = getattr(result, "error", None)
    return bool(error) and not str(error).startswith("non-finite")


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
