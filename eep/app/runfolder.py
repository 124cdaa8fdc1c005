"""A run folder's own config, its hash and resume: what makes ``resume=<folder>`` go on exactly where a run stopped.

An ``eep-search`` folder holds ``eep_config.yaml`` (the run's own config; Hydra rewrites ``.hydra/``) besides what
the search writes (``eep.search.run``: ``eep_state.pkl``, ``evaluations.jsonl``, ``best.json``); the report
(``eep.app.report``) adds ``report.json``, ``report.md``, ``curve.png``, ``usage.png`` and ``model/``.
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eep.errors import UserError
from eep.genome import Genome
from eep.search.loop import Racing
from eep.search.run import STATE
from eep.search.state import Phase, SearchState, load_checkpoint
from eep.search.strategy import EEPSettings
from eep.settings import check_parallel

CONFIG = "eep_config.yaml"
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
    """The installed versions of the packages a run's results depend on (recorded in its checkpoint)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing distribution is recorded, not fatal
            out[name] = "unknown"
    return out


def new_state(cfg: DictConfig, template: Genome, expert_groups: int) -> SearchState:
    """A fresh search state for ``cfg``: the two phases' optimisers and budgets, the template genome, the hash."""
    plan = (Phase("prune", cfg.optimizer.prune_name, cfg.search.prune_budget),
            Phase("merge", cfg.optimizer.merge_name, cfg.search.merge_budget))
    settings = EEPSettings(**OmegaConf.to_container(cfg.search.eep))
    racing = cfg.search.get("racing") or {}
    share = racing.get("slice", 1.0)
    return SearchState(plan=plan, template=template, seed=cfg.seed, settings=settings, expert_groups=expert_groups,
                       ask_batch=check_parallel(cfg)[0],
                       extra={"config_hash": config_hash(cfg), "versions": package_versions()},
                       racing=None if share >= 1.0 else Racing(share, int(racing.get("top", 8))),
                       gate_rows=cfg.search.get("merge_router", "probabilities") == "gate_rows")


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


def refuse_changed(saved_hash: str | None, cfg: DictConfig, run_dir: Path, force: bool) -> None:
    """A UserError if ``cfg``'s hash is not the one ``run_dir`` was started with, unless ``force``
    (``resume_force=true``); eep-search and eep-compare resume through it."""
    if saved_hash != config_hash(cfg) and not force:
        raise UserError(f"the config differs from the one {run_dir} was started with; resume with no other "
                        f"argument, or add resume_force=true to accept the change")


def resume_state(run_dir: Path, cfg: DictConfig, force: bool) -> SearchState:
    """The run's checkpoint; a changed config is a UserError unless ``force``."""
    state = load_checkpoint(run_dir / STATE)
    refuse_changed(state.extra.get("config_hash"), cfg, run_dir, force)
    return state


def search_folder(value) -> Path:
    """The eep-search run folder ``resume=<value>`` names (resolved), or a UserError naming it and the fix."""
    folder = Path(str(value)).resolve()
    if not (folder / CONFIG).is_file():
        raise UserError(f"resume={folder} is not an eep-search run folder (no {CONFIG}); give the folder a run "
                        f"printed when it started")
    return folder


def check_new_or_resumed(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The folder a run goes into (``cfg.resume`` or ``run_dir``), or None if that run is finished (said on
    stdout); a fresh run in a folder that already holds a search is a UserError naming the resume."""
    run_dir = Path(cfg.resume) if cfg.resume else Path(run_dir)
    if (run_dir / "report.json").exists():
        print(f"run {run_dir} is finished; nothing to do (report: {run_dir / 'report.md'})")
        return None
    if not cfg.resume and (run_dir / STATE).exists():
        raise UserError(f"{run_dir} already holds a search; resume it with resume={run_dir}")
    return run_dir
