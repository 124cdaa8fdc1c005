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

from eep.genome import Genome, depth_groups
from eep.search.state import Phase, SearchState, load_checkpoint, run_plan, save_checkpoint
from eep.search.strategy import EEPSettings

log = logging.getLogger(__name__)
STATE, CONFIG, ROWS = "eep_state.pkl", "eep_config.yaml", "evaluations.jsonl"
VERSIONED = ("eep", "torch", "transformers", "lm_eval", "nevergrad", "hydra-core")


class UserError(ValueError):
    """A problem with the user's settings: printed as one line, exit status 2, no traceback."""


NOT_HASHED = ("workers", "ray_address")  # evaluator keys that do not change which genomes a run evaluates


def config_hash(cfg: DictConfig) -> str:
    """Hash of the run-defining config (``resume``, ``resume_force``, ``evaluator.workers`` and
    ``evaluator.ray_address`` excluded: a run may be resumed on another pool; its ``ask_batch`` is in its state)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in data.items() if k not in ("resume", "resume_force")}
    if isinstance(data.get("evaluator"), dict):
        data["evaluator"] = {k: v for k, v in data["evaluator"].items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing distribution is recorded, not fatal
            out[name] = "unknown"
    return out


def check_settings(cfg: DictConfig, num_layers: int, num_experts: int, model_top_k: int) -> tuple[int, int, tuple]:
    """``(E', k', layer groups)`` from the search config, or a UserError naming the key and what is valid."""
    s = cfg.search
    kept = s.num_experts
    if not isinstance(kept, int) or not 1 <= kept <= num_experts:
        raise UserError(f"search.num_experts={kept!r}: must be an integer between 1 and the model's {num_experts} "
                        f"experts")
    top_k = min(model_top_k, kept) if s.top_k is None else s.top_k
    if not isinstance(top_k, int) or not 1 <= top_k <= kept:
        raise UserError(f"search.top_k={s.top_k!r}: must be an integer between 1 and search.num_experts={kept}")
    for key in ("prune_budget", "merge_budget", "final_candidates"):
        if not isinstance(s[key], int) or s[key] < 0:
            raise UserError(f"search.{key}={s[key]!r}: must be an integer >= 0")
    groups = s.layer_groups
    if groups != "per_layer" and not (isinstance(groups, int) and 1 <= groups <= num_layers):
        raise UserError(f"search.layer_groups={groups!r}: use per_layer or a number of depth groups between 1 and "
                        f"{num_layers} (the model's MoE layers)")
    return kept, top_k, depth_groups(num_layers, None if groups == "per_layer" else groups)


def check_parallel(cfg: DictConfig) -> tuple[int, int]:
    """``(ask_batch, workers)`` from ``search.ask_batch`` (null: the worker count) and ``evaluator.workers``, and
    ``evaluator.threads`` checked; a UserError names the key."""
    workers, threads, batch = cfg.evaluator.workers, cfg.evaluator.threads, cfg.search.ask_batch
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"evaluator.workers={workers!r}: must be an integer >= 1")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"evaluator.threads={threads!r}: must be null (the default) or an integer >= 1")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise UserError(f"search.ask_batch={batch!r}: must be null (evaluator.workers) or an integer >= 1")
    return batch or workers, workers


def new_state(cfg: DictConfig, template: Genome, expert_groups: int) -> SearchState:
    plan = (Phase("prune", cfg.optimizer.prune_name, cfg.search.prune_budget),
            Phase("merge", cfg.optimizer.merge_name, cfg.search.merge_budget))
    settings = EEPSettings(**OmegaConf.to_container(cfg.search.eep))
    return SearchState(plan=plan, template=template, seed=cfg.seed, settings=settings, expert_groups=expert_groups,
                       ask_batch=check_parallel(cfg)[0],
                       extra={"config_hash": config_hash(cfg), "versions": package_versions()})


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


def search(state: SearchState, pool, run_dir: Path, time_limit: float | None, on_evaluated=None) -> SearchState:
    """Run (or go on with) the plan on ``pool`` (``eep.search.loop.SerialPool`` or ``eep.parallel.RayPool``),
    checkpointing into ``run_dir``; ``on_evaluated(genome, result, phase)`` per new genome, in ask order."""
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)
    return run_plan(state, pool, checkpoint=lambda s: save_checkpoint(s, run_dir / STATE),
                    on_evaluated=on_evaluated, stop=None if deadline is None else lambda: time.monotonic() > deadline)


def write_best(run_dir: Path, fitness: float, genome: Genome) -> None:
    (run_dir / "best.json").write_text(json.dumps({"genome_hash": genome.content_hash(), "fitness": fitness,
                                                   "genome": genome.to_dict()}, indent=1) + "\n")
