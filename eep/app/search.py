"""What ``eep-search`` does with a composed config and its run folder (the CLI only wires Hydra to this).

Data path: config -> validated settings (``eep.settings``) -> :class:`~eep.app.session.Session` (model, tokenizer,
materialiser) -> the full model's score -> the search (``eep.search``: genomes scored on a pool, checkpointed)
-> the final pick on validation -> test scores in place and exported (:mod:`eep.app.report`).
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from eep import settings
from eep.app import report as reports
from eep.app import runfolder
from eep.app.session import Session, make_evaluator, pool, task_names
from eep.errors import UserError
from eep.genome import Genome
from eep.search import run as search_run
from eep.search.final import pick_final

log = logging.getLogger("eep.search")


def validate(cfg: DictConfig):
    """Every key checked before the weights load (``eep.settings``: types, ranges, paths, names, combinations),
    then the counts against the model's config.json. Returns the model's adapter (on the meta device), E', k' and
    the layer groups."""
    settings.check(cfg, "eep-search")
    shape = settings.check_shape(cfg)
    return shape.adapter, shape.num_experts, shape.top_k, shape.groups


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None,
        loaded: Session | None = None) -> dict | None:
    """Run or resume the search of ``cfg`` in ``run_dir``; returns the report (None if the run was finished, {}
    if it stopped at its time limit). On resume with ``overrides`` (a command line's), the run's saved config with
    them applied is what goes on (:func:`eep.app.runfolder.resumed_config`); without, ``cfg`` as given.
    ``loaded``: a session whose model this process reuses instead of loading it again (``eep-compare``)."""
    if cfg.resume and overrides is not None:
        saved = OmegaConf.load(runfolder.search_folder(cfg.resume) / runfolder.CONFIG)
        cfg = runfolder.resumed_config(cfg, saved, overrides)
    run_dir = runfolder.check_new_or_resumed(cfg, run_dir)
    if run_dir is None:
        return None
    adapter, kept, k, groups = validate(cfg)
    state = runfolder.resume_state(run_dir, cfg, cfg.resume_force) if cfg.resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        OmegaConf.save(cfg, run_dir / runfolder.CONFIG)
    full = Genome.pruning([list(range(adapter.num_experts))] * len(groups), adapter.num_experts, adapter.top_k, groups)
    template = Genome.pruning([list(range(kept))] * len(groups), adapter.num_experts, k, groups)
    return _run(cfg, run_dir, state or runfolder.new_state(cfg, template, adapter.expert_groups), full, loaded)


def _run(cfg: DictConfig, run_dir: Path, state, full, loaded: Session | None = None) -> dict:
    """Score the full model (``full``: the genome keeping every expert) on the search split, search on the pool (a
    serial run loads its model first; a parallel one after the search, for the final pick), then finish. The run's
    own ``state.ask_batch`` stands on resume."""
    if cfg.evaluator.threads:
        torch.set_num_threads(cfg.evaluator.threads)
    if state.ask_batch != settings.check_parallel(cfg)[0]:
        log.warning("the run asks %d candidates at a time (fixed when it started)", state.ask_batch)
    session = Session(cfg, loaded=loaded) if cfg.evaluator.workers == 1 else None
    rows = search_run.RowLog(run_dir / search_run.ROWS)
    start = time.time()
    with pool(cfg, session) as workers:
        _baseline(cfg, state, workers, session, run_dir, full)
        with reports.Progress(state) as bar:
            def record(genome, result, phase: str) -> None:
                rows.append(search_run.row(genome, result, phase))
                bar(genome, result, phase)

            session = _init_from(cfg, state, workers, session, run_dir, record, loaded)
            state = search_run.search(state, workers, run_dir, cfg.search.time_limit, on_evaluated=record,
                                      max_failed=cfg.search.get("max_failed_candidates", 5))
        restarts = list(getattr(workers, "events", []))
    search = {"search_seconds": time.time() - start, "workers": cfg.evaluator.workers, "worker_restarts": restarts}
    if not state.finished:
        print(f"time limit reached after {len(state.archive.entries)} evaluations; resume with resume={run_dir}")
        return {}
    search_run.write_best(run_dir, *state.archive.best())
    return _finish(cfg, run_dir, session or Session(cfg, search=False, loaded=loaded), state, rows, search)


def _baseline(cfg: DictConfig, state, workers, session: Session | None, run_dir: Path, full) -> None:
    """The full model's score on the search split, before any candidate (once per run, kept in the checkpoint and
    reported as ``search_full``): if its evaluation raises, no candidate can be scored either, so the run stops
    here with one line naming the task, the error and the way out, instead of scoring every candidate -1."""
    if "baseline" in state.extra:
        return
    if session is not None:  # the unpruned model itself, in this process
        result = session.searcher.evaluate()
        result.seconds = round(result.seconds, 4)
    else:  # on a worker: the genome keeping every expert with the model's own top-k is the unpruned model
        out = []
        workers.run([full], lambda genome, result: out.append(result))
        result = out[0]
    if search_run.raised(result):
        names, batch = task_names(cfg)[0], cfg.evaluator.batch_size
        way_out = (f"evaluator.batch_size=1 (batched generation fails inside some models; lm-eval's scores depend on "
                   f"the batch size, so eep does not change it silently)" if batch > 1 else
                   "check that the model runs under plain lm_eval --model hf with these tasks")
        raise UserError(f"the full model cannot be evaluated on {', '.join(names)} (search split, "
                        f"evaluator.batch_size={batch}): {str(result.error).splitlines()[0]}; nothing was "
                        f"searched; try {way_out}")
    if result.error:
        log.warning("the full model scores %s on the search split: %s", result.fitness, result.error)
    state.extra["baseline"] = {"fitness": result.fitness, "metrics": result.metrics, "error": result.error,
                               "forward_tokens": getattr(result, "forward_tokens", 0)}
    search_run.save_checkpoint(state, run_dir / search_run.STATE)
    log.info("full model on the search split: fitness %.4f", result.fitness)


def _init_from(cfg: DictConfig, state, workers, session: Session | None, run_dir: Path, record,
               loaded: Session | None = None) -> Session | None:
    """``search.init_from``: the methods' genomes (:mod:`eep.app.seeding`) are the run's first evaluations, one
    batch on the pool, committed together in the methods' order (pruning genomes in the pruning phase, counting
    toward its budget; merging ones in the merging phase), so the search's first generation holds them. Once per
    run: a resumed run has them in its archive (or, killed before the commit, computes the same ones again).
    Returns the session it used (a parallel run loads one in this process for the seeds; the final pick reuses it)."""
    from eep.app.seeding import seed_genomes

    if not settings.init_methods(cfg) or state.archive.entries or state.phase_index > 0:
        return session
    session = session or Session(cfg, search=False, loaded=loaded)
    seeds = seed_genomes(cfg, session, state.template, run_dir)
    results = {}

    def done(genome, result) -> None:
        results[genome.content_hash()] = result

    workers.run([genome for _, genome in seeds], done)
    for method, genome in seeds:
        result, phase = results[genome.content_hash()], "prune" if genome.is_pruning else "merge"
        state.archive.add(genome, result.fitness, phase)
        record(genome, result, phase)
        log.info("search.init_from: %s, genome %s, fitness %.4f", method, genome.content_hash(), result.fitness)
    search_run.save_checkpoint(state, run_dir / search_run.STATE)
    return session


def _finish(cfg, run_dir: Path, session: Session, state, rows, search: dict) -> dict:
    """Pick the final candidate on validation, score it in place and exported, write the report (``search``:
    seconds, workers and worker restarts of the search)."""
    names = task_names(cfg)[0]
    validator, tester = session.evaluator("validation"), session.evaluator("test")
    best, picked = pick_final(state.archive, session.mat, validator, cfg.search.final_candidates)
    value = functools.partial(_reported, names=names)
    full = {"validation": value(validator.evaluate()), "test": value(tester.evaluate())}
    exported, reloaded = _export_best(cfg, run_dir, session, best, validator, tester, value)
    evaluations = rows.rows()
    search["cost"] = {"forward_tokens": int(sum(r.get("forward_tokens", 0) for r in evaluations) +
                                            state.extra.get("baseline", {}).get("forward_tokens", 0)),
                      "candidates": len(state.archive.entries), "seconds": round(search["search_seconds"], 2)}
    report = reports.search_report(cfg, session, state, best, picked, full, exported, search, tester,
                                   reports.measurements(session, best, reloaded, validator, run_dir))
    reports.write_report(run_dir, report)
    reports.plot_curve(evaluations, run_dir / "curve.png")
    reports.print_summary(report)
    return report


def _reported(score, names: list[str]) -> float | None:
    """The value a report shows for a Score (:func:`eep.app.report.reported_value`); None if the evaluation
    raised (the evaluator logged why)."""
    if score.error and not score.metrics:
        return None
    return reports.reported_value(score, names)


def _export_best(cfg, run_dir: Path, session: Session, best, validator, tester, value):
    """Export ``best`` to ``run_dir/model`` and score it there and in place on the test split (``export``'s
    ``rescore``); returns the ExportResult and the reloaded checkpoint (for the measurements)."""
    from eep.export import export

    kept = {}

    def rescore(model) -> float:
        if model is session.model:
            result = value(tester.evaluate())
        else:
            kept["reloaded"] = model
            result = value(make_evaluator(cfg, model, session.tok, "test").evaluate())
        return float("nan") if result is None else result

    calibration = None if best.exports_exactly else session.gate_calibration(validator)
    exported = export(session.model, best, run_dir / "model", session.tok, materializer=session.mat,
                      calibration=calibration, rescore=rescore,
                      provenance={"base_model": session.model.config._name_or_path, "method": "eep"})
    return exported, kept["reloaded"]
