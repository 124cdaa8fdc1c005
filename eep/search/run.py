"""One eep-search run: validate the config, search on the search split, pick on validation, report on test, export.

Files in the run folder: ``eep_config.yaml`` (the run's own config; Hydra rewrites ``.hydra/``), ``eep_state.pkl``
(checkpoint after every evaluation), ``evaluations.jsonl`` (one row per distinct evaluation), ``best.json``,
``report.json``, ``report.md``, ``curve.png`` and ``model/`` (the exported checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
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


def config_hash(cfg: DictConfig) -> str:
    """Hash of the run-defining config (``resume`` and ``resume_force`` excluded)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in data.items() if k not in ("resume", "resume_force")}
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


def new_state(cfg: DictConfig, template: Genome, expert_groups: int) -> SearchState:
    plan = (Phase("prune", cfg.optimizer.prune_name, cfg.search.prune_budget),
            Phase("merge", cfg.optimizer.merge_name, cfg.search.merge_budget))
    settings = EEPSettings(**OmegaConf.to_container(cfg.search.eep))
    return SearchState(plan=plan, template=template, seed=cfg.seed, settings=settings, expert_groups=expert_groups,
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


def make_evaluate(materializer, evaluator, rows: RowLog, phase_of):
    """``genome -> fitness`` on the search split, recording a row (metrics, seconds, error) per evaluation."""

    def evaluate(genome: Genome) -> float:
        start = time.perf_counter()
        try:
            materializer.apply(genome)
        except ValueError as err:  # an invalid candidate is contained like a failing one
            rows.append({"genome_hash": genome.content_hash(), "phase": phase_of(), "fitness": -1.0, "metrics": {},
                         "seconds": 0.0, "error": str(err)})
            return -1.0
        score = evaluator.evaluate()
        rows.append({"genome_hash": genome.content_hash(), "phase": phase_of(), "fitness": score.fitness,
                     "metrics": score.metrics, "seconds": round(time.perf_counter() - start, 4),
                     "error": score.error, "genome": genome.to_dict()})
        return score.fitness

    return evaluate


def search(state: SearchState, evaluate, run_dir: Path, time_limit: float | None, progress=None) -> SearchState:
    """Run (or go on with) the plan, checkpointing after every evaluation into ``run_dir``."""
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)
    return run_plan(state, evaluate, checkpoint=lambda s: save_checkpoint(s, run_dir / STATE),
                    on_evaluated=progress, stop=None if deadline is None else lambda: time.monotonic() > deadline)


def write_best(run_dir: Path, fitness: float, genome: Genome) -> None:
    (run_dir / "best.json").write_text(json.dumps({"genome_hash": genome.content_hash(), "fitness": fitness,
                                                   "genome": genome.to_dict()}, indent=1) + "\n")
