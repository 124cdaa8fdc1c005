"""What ``eep-search`` does with a composed config and its run folder (the CLI only wires Hydra to this)."""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from eep.search import final as F
from eep.search import run as R

log = logging.getLogger("eep.search")


def task_names(cfg: DictConfig) -> tuple[list[str], tuple[str, ...]]:
    """The task config's lm-eval task names and include paths."""
    names = list(cfg.task.names)
    paths = (str(cfg.task.include_path),) if cfg.task.include_path else ()
    return names, paths


def _shape(cfg: DictConfig):
    """Adapter class, MoE layer count, E and k of the configured model, from its config alone (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eep.arch import adapter_for
    from eep.models import ModelConfig

    where = ModelConfig(**OmegaConf.to_container(cfg.model)).location()
    config = AutoConfig.from_pretrained(where)
    with torch.device("meta"):
        adapter = adapter_for(AutoModelForCausalLM.from_config(config))
    return adapter, len(adapter.layers), adapter.num_experts, adapter.top_k


def _check_optimizers(cfg: DictConfig) -> None:
    import nevergrad as ng

    from eep.search.proposers import nevergrad_optimizer

    for key in ("prune_name", "merge_name"):
        name = cfg.optimizer[key]
        if name != "eep" and name not in ng.optimizers.registry:
            try:
                nevergrad_optimizer(name, ng.p.Scalar(), 1, 0)
            except ValueError as err:
                raise R.UserError(f"optimizer.{key}: {err}") from None


def validate(cfg: DictConfig):
    """Everything checkable before the weights load: tasks, optimisers, workers (and Ray if they need it), counts
    against the model's config. Returns the model's adapter (on the meta device), E', k' and the layer groups."""
    from eep.evaluate.reference import manager_for

    names, paths = task_names(cfg)
    manager_for(names, paths)
    _check_optimizers(cfg)
    if R.check_parallel(cfg)[1] > 1:
        from eep.parallel import _ray

        _ray()
    adapter, layers, experts, top_k = _shape(cfg)
    kept, k, groups = R.check_settings(cfg, layers, experts, top_k)
    _check_init_from(cfg, len(groups), layers)
    return adapter, kept, k, groups


# methods whose result is a genome over the original weights alone (no weight rewrite, no routing patch)
SEEDABLE = ("random", "frequency", "soft_activation", "reap", "enumeration", "enumeration_progressive", "hc_smoe")


def _check_init_from(cfg: DictConfig, num_groups: int, num_layers: int) -> None:
    method = cfg.search.init_from
    if method is None:
        return
    if method not in SEEDABLE:
        raise R.UserError(f"search.init_from={method}: use one of {', '.join(SEEDABLE)} (methods whose result is a "
                          "genome alone; m_smoe and svd_compress rewrite expert weights, skipping patches routing)")
    if num_groups != num_layers:
        raise R.UserError(f"search.init_from={method} gives one genome pair per layer: use it with "
                          f"search.layer_groups=per_layer (not {cfg.search.layer_groups})")


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Run or resume the search of ``cfg`` in ``run_dir``; returns the report (None if the run was finished)."""
    run_dir = Path(cfg.resume) if cfg.resume else Path(run_dir)
    if (run_dir / "report.json").exists():
        print(f"run {run_dir} is finished; nothing to do (report: {run_dir / 'report.md'})")
        return None
    if not cfg.resume and (run_dir / R.STATE).exists():
        raise R.UserError(f"{run_dir} already holds a search; resume it with resume={run_dir}")
    state = R.resume_state(run_dir, cfg, cfg.resume_force) if cfg.resume else None
    adapter, kept, k, groups = validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        OmegaConf.save(cfg, run_dir / R.CONFIG)
    return _run(cfg, run_dir, state or R.new_state(cfg, *_template(adapter, kept, k, groups)))


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
    from eep.genome import Genome

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


def _run(cfg: DictConfig, run_dir: Path, state) -> dict:
    """Search on the pool (a serial run loads its model first; a parallel one after the search, for the final
    pick), then finish. The run's own ``state.ask_batch`` stands on resume."""
    if cfg.evaluator.threads:
        torch.set_num_threads(cfg.evaluator.threads)
    if state.ask_batch != R.check_parallel(cfg)[0]:
        log.warning("the run asks %d candidates at a time (fixed when it started)", state.ask_batch)
    replica = Replica(cfg) if cfg.evaluator.workers == 1 else None
    rows = R.RowLog(run_dir / R.ROWS)
    start = time.time()
    with _pool(cfg, replica) as pool, _progress(state) as bar:
        def record(genome, result, phase: str) -> None:
            rows.append(R.row(genome, result, phase))
            bar(genome, result, phase)

        _init_from(cfg, state, pool, replica, run_dir, record)
        state = R.search(state, pool, run_dir, cfg.search.time_limit, on_evaluated=record)
        restarts = list(getattr(pool, "events", []))
    search = {"search_seconds": time.time() - start, "workers": cfg.evaluator.workers, "worker_restarts": restarts}
    if not state.finished:
        print(f"time limit reached after {len(state.archive.entries)} evaluations; resume with resume={run_dir}")
        return {}
    R.write_best(run_dir, *state.archive.best())
    return _finish(cfg, run_dir, replica or Replica(cfg, search=False), state, rows, search)


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

    def value(score) -> float:
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
        "search_seconds": search["search_seconds"], "evaluations": len(state.archive.entries), "generation": speed,
        "best_hash": best.content_hash(), "validation_candidates": picked["candidates"],
        "export": {"exact": exported.exact, "router_top_k_overlap": exported.router_top_k_overlap},
        "seed": cfg.seed, "versions": state.extra.get("versions"),
    }
    F.write_report(run_dir, report)
    F.plot_curve(rows.rows(), run_dir / "curve.png")
    _print_summary(report)
    return report


def _print_summary(report: dict) -> None:
    t, p = report["test"], report["parameters"]
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
