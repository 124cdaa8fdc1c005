"""What ``eep-search`` does with a composed config and its run folder (the CLI only wires Hydra to this)."""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from eep import settings as S
from eep.genome import Genome
from eep.search import final as F
from eep.search import run as R

log = logging.getLogger("eep.search")


def task_names(cfg: DictConfig) -> tuple[list[str], tuple[str, ...]]:
    """The task config's lm-eval task names and include paths."""
    names = list(cfg.task.names)
    paths = (str(cfg.task.include_path),) if cfg.task.include_path else ()
    return names, paths


_check_optimizers = S.check_optimizers
SEEDABLE = S.SEEDABLE


def validate(cfg: DictConfig):
    """Every key checked before the weights load (``eep.settings``: types, ranges, paths, names, combinations),
    then the counts against the model's config.json. Returns the model's adapter (on the meta device), E', k' and
    the layer groups."""
    S.check(cfg, "eep-search")
    shape = S.check_shape(cfg)
    return shape.adapter, shape.num_experts, shape.top_k, shape.groups


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Run or resume the search of ``cfg`` in ``run_dir``; returns the report (None if the run was finished)."""
    run_dir = Path(cfg.resume) if cfg.resume else Path(run_dir)
    if (run_dir / "report.json").exists():
        print(f"run {run_dir} is finished; nothing to do (report: {run_dir / 'report.md'})")
        return None
    if not cfg.resume and (run_dir / R.STATE).exists():
        raise R.UserError(f"{run_dir} already holds a search; resume it with resume={run_dir}")
    adapter, kept, k, groups = validate(cfg)
    state = R.resume_state(run_dir, cfg, cfg.resume_force) if cfg.resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        OmegaConf.save(cfg, run_dir / R.CONFIG)
    full = Genome.pruning([list(range(adapter.num_experts))] * len(groups), adapter.num_experts, adapter.top_k, groups)
    return _run(cfg, run_dir, state or R.new_state(cfg, *_template(adapter, kept, k, groups)), full)


def make_evaluator(cfg: DictConfig, model, tokenizer, role: str):
    """The Evaluator of ``role`` (search, validation or test) for ``cfg``'s tasks, splits and evaluator keys."""
    from eep.evaluate.evaluator import Evaluator

    names, paths = task_names(cfg)
    ev = cfg.evaluator
    limits = {"search": ev.limit, "validation": ev.validation_limit, "test": ev.test_limit}
    overrides = {"search": cfg.task.search_split, "validation": cfg.task.validation_split,
                 "test": cfg.task.report_split}
    weights = OmegaConf.to_container(cfg.task.weights) if cfg.task.weights else None
    return Evaluator(model, tokenizer, names, role=role, limit=limits[role], batch_size=ev.batch_size,
                     include_paths=paths, split_overrides=overrides, split_seed=ev.split_seed, weights=weights,
                     num_fewshot=ev.num_fewshot, apply_chat_template=ev.apply_chat_template,
                     progress=ev.progress and role == "search")


def _template(adapter, kept: int, top_k: int, groups):
    """The genome fixing the candidates' shape (the first E' experts kept) and the expert-group count (DeepSeek)."""
    expert_groups = int(getattr(adapter.model.config, "n_group", 1) or 1) if adapter.name() == "DeepseekV3" else 1
    return Genome.pruning([list(range(kept))] * len(groups), adapter.num_experts, top_k, groups), expert_groups


class Replica:
    """One loaded model with its materialiser and (``search=True``) its search-split Evaluator: what a serial run
    holds, and what every Ray worker builds from the same config (``replica_scorer``)."""

    def __init__(self, cfg: DictConfig, search: bool = True):
        from eep.materialize import Materializer
        from eep.models import ModelConfig, load_model

        self.model, self.tok = load_model(ModelConfig(**OmegaConf.to_container(cfg.model)))
        self.mat = Materializer(self.model)
        self.searcher = make_evaluator(cfg, self.model, self.tok, "search") if search else None

    def score(self, genome) -> R.Evaluation:
        return R.score(self.mat, self.searcher, genome)


def replica_scorer(cfg: dict):
    """Run once in each Ray worker: a Replica of the (resolved, plain) config; its ``score``."""
    return Replica(OmegaConf.create(cfg)).score


def _pool(cfg: DictConfig, replica: Replica | None):
    """The serial pool over ``replica``, or a RayPool of ``evaluator.workers`` replicas (a context manager)."""
    from eep.search.loop import SerialPool

    ev = cfg.evaluator
    if ev.workers == 1:
        return contextlib.nullcontext(SerialPool(replica.score))
    from eep.parallel import RayPool

    build = functools.partial(replica_scorer, OmegaConf.to_container(cfg, resolve=True))
    gpu = cfg.model.device != "cpu" or cfg.model.device_map is not None
    return RayPool(build, ev.workers, ev.threads, ev.ray_address, gpus=gpu)


def _run(cfg: DictConfig, run_dir: Path, state, full) -> dict:
    """Score the full model (``full``: the genome keeping every expert) on the search split, search on the pool (a
    serial run loads its model first; a parallel one after the search, for the final pick), then finish. The run's
    own ``state.ask_batch`` stands on resume."""
    if cfg.evaluator.threads:
        torch.set_num_threads(cfg.evaluator.threads)
    if state.ask_batch != R.check_parallel(cfg)[0]:
        log.warning("the run asks %d candidates at a time (fixed when it started)", state.ask_batch)
    replica = Replica(cfg) if cfg.evaluator.workers == 1 else None
    rows = R.RowLog(run_dir / R.ROWS)
    start = time.time()
    with _pool(cfg, replica) as pool:
        _baseline(cfg, state, pool, replica, run_dir, full)
        with _progress(state) as bar:
            def record(genome, result, phase: str) -> None:
                rows.append(R.row(genome, result, phase))
                bar(genome, result, phase)

            _init_from(cfg, state, pool, replica, run_dir, record)
            state = R.search(state, pool, run_dir, cfg.search.time_limit, on_evaluated=record,
                             max_failed=cfg.search.get("max_failed_candidates", 5))
        restarts = list(getattr(pool, "events", []))
    search = {"search_seconds": time.time() - start, "workers": cfg.evaluator.workers, "worker_restarts": restarts}
    if not state.finished:
        print(f"time limit reached after {len(state.archive.entries)} evaluations; resume with resume={run_dir}")
        return {}
    R.write_best(run_dir, *state.archive.best())
    return _finish(cfg, run_dir, replica or Replica(cfg, search=False), state, rows, search)


def _baseline(cfg: DictConfig, state, pool, replica: Replica | None, run_dir: Path, full) -> None:
    """The full model's score on the search split, before any candidate (once per run, kept in the checkpoint and
    reported as ``search_full``): if its evaluation raises, no candidate can be scored either, so the run stops
    here with one line naming the task, the error and the way out, instead of scoring every candidate -1."""
    if "baseline" in state.extra:
        return
    if replica is not None:  # the unpruned model itself, in this process
        score = replica.searcher.evaluate()
        result = R.Evaluation(score.fitness, score.metrics, round(score.seconds, 4), score.error)
    else:  # on a worker: the genome keeping every expert with the model's own top-k is the unpruned model
        out = []
        pool.run([full], lambda genome, result: out.append(result))
        result = out[0]
    if R.raised(result):
        names, batch = task_names(cfg)[0], cfg.evaluator.batch_size
        way_out = (f"evaluator.batch_size=1 (batched generation fails inside some models; lm-eval's scores depend on "
                   f"the batch size, so eep does not change it silently)" if batch > 1 else
                   "check that the model runs under plain lm_eval --model hf with these tasks")
        raise R.UserError(f"the full model cannot be evaluated on {', '.join(names)} (search split, "
                          f"evaluator.batch_size={batch}): {str(result.error).splitlines()[0]}; nothing was "
                          f"searched; try {way_out}")
    if result.error:
        log.warning("the full model scores %s on the search split: %s", result.fitness, result.error)
    state.extra["baseline"] = {"fitness": result.fitness, "metrics": result.metrics, "error": result.error}
    R.save_checkpoint(state, run_dir / R.STATE)
    log.info("full model on the search split: fitness %.4f", result.fitness)


def _init_from(cfg: DictConfig, state, pool, replica: Replica | None, run_dir: Path, record) -> None:
    """``search.init_from=<method>``: the method's genome (``eep.methods``, calibrated on the search split's first
    ``evaluator.limit`` documents) is the run's first evaluation, in the pruning phase if it is a pruning genome
    (it counts toward that budget) and the merging phase otherwise, so that the EEP strategy breeds from it. Once per
    run: a resumed run already has it in its archive."""
    from eep.methods import calibration_batch, compute

    method = cfg.search.init_from
    if method is None or state.archive.entries or state.phase_index > 0:
        return
    source = replica or Replica(cfg, search=False)
    searcher = source.searcher or make_evaluator(cfg, source.model, source.tok, "search")
    calibration = calibration_batch(source.model, source.tok, searcher, n=cfg.evaluator.limit or 64)
    t = state.template
    genome = compute(method, source.model, source.mat, calibration, num_kept=t.num_kept, top_k=t.top_k,
                     seed=cfg.seed).genome
    phase = "prune" if genome.is_pruning else "merge"

    def done(genome, result) -> None:
        state.archive.add(genome, result.fitness, phase)
        record(genome, result, phase)
        R.save_checkpoint(state, run_dir / R.STATE)

    pool.run([genome], done)
    log.info("search.init_from=%s: genome %s, fitness %.4f", method, genome.content_hash(),
             state.archive.fitness(genome))


def _finish(cfg, run_dir, replica: Replica, state, rows, search: dict) -> dict:
    """Pick the final candidate on validation, score it in place and exported, write the report (``search``:
    seconds, workers and worker restarts of the search)."""
    from transformers import AutoModelForCausalLM

    from eep.export import export

    ev, model, tok, mat, names = cfg.evaluator, replica.model, replica.tok, replica.mat, task_names(cfg)[0]
    validator = make_evaluator(cfg, model, tok, "validation")
    best, picked = F.pick_final(state.archive, mat, validator, cfg.search.final_candidates)
    tester = make_evaluator(cfg, model, tok, "test")
    single = names[0] if len(names) == 1 else None

    def value(score) -> float | None:
        if score.error and not score.metrics:  # the evaluation raised: nothing to report (logged by the evaluator)
            return None
        return F.reported_value(score, names)

    full_val, full_test = value(validator.evaluate()), value(tester.evaluate())
    with mat.applied(best):
        best_test = value(tester.evaluate())
    calibration = None if best.is_pruning else F.calibration_tokens(validator, tok, n=256)
    exported = export(model, best, run_dir / "model", tok, materializer=mat, calibration=calibration,
                      provenance={"base_model": mat.model.config._name_or_path, "method": "eep",
                                  "scores": {"test": best_test}})
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=model.dtype).to(model.device).eval()
    exported_test = value(make_evaluator(cfg, reloaded, tok, "test").evaluate())
    batch = F.calibration_tokens(validator, tok, n=32)
    with mat.applied(best):
        usage_after = F.expert_usage(model, mat.adapter, batch)
    F.plot_usage(F.expert_usage(model, mat.adapter, batch), usage_after, run_dir / "usage.png")
    gen_batch = F.calibration_tokens(validator, tok, n=32, padding_side="left", prompts_only=True)
    speed = {"full": F.generation_speed(model, gen_batch), "exported": F.generation_speed(reloaded, gen_batch)}
    report = {
        "task": single or names, "model": str(cfg.model.path or cfg.model.name),
        "test_split": tester.plans[next(iter(tester.plans))]["test"].name, "test_limit": ev.test_limit,
        "test": {"full": full_test, "best_in_place": best_test, "best_exported": exported_test},
        "validation": {"full": full_val, "best_in_place": next(iter(picked["metrics"][single].values()))
                       if single else picked["fitness"]},
        "workers": search["workers"], "worker_restarts": search["worker_restarts"],
        "experts": {"before": mat.adapter.num_experts, "after": best.num_kept},
        "top_k": {"before": mat.adapter.top_k, "after": best.top_k},
        "parameters": {"before": F.parameter_counts(model, mat.adapter),
                       "after": F.parameter_counts(model, mat.adapter, best.num_kept)},
        "search_full": state.extra.get("baseline"), "search_seconds": search["search_seconds"], "evaluations": len(state.archive.entries), "generation": speed,
        "best_hash": best.content_hash(), "validation_candidates": picked["candidates"],
        "export": {"exact": exported.exact, "router_top_k_overlap": exported.router_top_k_overlap},
        "seed": cfg.seed, "versions": state.extra.get("versions"),
    }
    F.write_report(run_dir, report)
    F.plot_curve(rows.rows(), run_dir / "curve.png")
    _print_summary(report)
    return report


def _print_summary(report: dict) -> None:
    p = report["parameters"]
    t = {k: float("nan") if v is None else v for k, v in report["test"].items()}
    print(f"\n{report['task']} (test split, {report['test_limit'] or 'all'} docs)")
    print(f"{'':<18}{'test':>8}{'experts':>9}{'parameters':>13}")
    print(f"{'full':<18}{t['full']:>8.4f}{report['experts']['before']:>9}{p['before']['total']:>13,}")
    print(f"{'eep (in place)':<18}{t['best_in_place']:>8.4f}{report['experts']['after']:>9}"
          f"{p['after']['total']:>13,}")
    print(f"{'eep (exported)':<18}{t['best_exported']:>8.4f}{report['experts']['after']:>9}"
          f"{p['after']['total']:>13,}")


class _progress:
    """A tqdm bar over distinct evaluations showing phase and best fitness (also a ``progress`` callback)."""

    def __init__(self, state):
        from tqdm import tqdm

        total = sum(p.budget for p in state.plan)
        self.state = state
        self.bar = tqdm(total=total, initial=len(state.archive.entries), desc="eep-search", unit="eval")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def __call__(self, genome, fitness, phase):
        self.bar.update(1)
        self.bar.set_postfix(phase=phase, best=f"{self.state.archive.best()[0]:.4f}")
