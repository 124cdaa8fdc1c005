"""What ``eep-search`` does with a composed config and its run folder (the CLI only wires Hydra to this)."""
from __future__ import annotations

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
    """Everything checkable before the weights load: tasks, optimisers, counts against the model's config."""
    from eep.evaluate.reference import manager_for

    names, paths = task_names(cfg)
    manager_for(names, paths)
    _check_optimizers(cfg)
    adapter, layers, experts, top_k = _shape(cfg)
    kept, k, groups = R.check_settings(cfg, layers, experts, top_k)
    return type(adapter), kept, k, groups


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Run or resume the search of ``cfg`` in ``run_dir``; returns the report (None if the run was finished)."""
    run_dir = Path(cfg.resume) if cfg.resume else Path(run_dir)
    if (run_dir / "report.json").exists():
        print(f"run {run_dir} is finished; nothing to do (report: {run_dir / 'report.md'})")
        return None
    if not cfg.resume and (run_dir / R.STATE).exists():
        raise R.UserError(f"{run_dir} already holds a search; resume it with resume={run_dir}")
    state = R.resume_state(run_dir, cfg, cfg.resume_force) if cfg.resume else None
    _, kept, k, groups = validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        OmegaConf.save(cfg, run_dir / R.CONFIG)
    return _run(cfg, run_dir, kept, k, groups, state)


def _run(cfg: DictConfig, run_dir: Path, kept: int, top_k: int, groups, state=None) -> dict:
    from eep.evaluate.evaluator import Evaluator
    from eep.genome import Genome
    from eep.materialize import Materializer
    from eep.models import ModelConfig, load_model

    model_cfg = ModelConfig(**OmegaConf.to_container(cfg.model))
    model, tok = load_model(model_cfg)
    mat = Materializer(model)
    names, paths = task_names(cfg)
    ev = cfg.evaluator
    overrides = {"search": cfg.task.search_split, "validation": cfg.task.validation_split,
                 "test": cfg.task.report_split}
    common = dict(batch_size=ev.batch_size, include_paths=paths, split_overrides=overrides,
                  split_seed=ev.split_seed, weights=OmegaConf.to_container(cfg.task.weights) if cfg.task.weights
                  else None, num_fewshot=ev.num_fewshot, apply_chat_template=ev.apply_chat_template)
    searcher = Evaluator(model, tok, names, role="search", limit=ev.limit, progress=ev.progress, **common)
    expert_groups = int(getattr(model.config, "n_group", 1) or 1) if mat.adapter.name() == "DeepseekV3" else 1
    template = Genome.pruning([list(range(kept))] * len(groups), mat.adapter.num_experts, top_k, groups)
    state = state or R.new_state(cfg, template, expert_groups)
    rows = R.RowLog(run_dir / R.ROWS)

    def phase() -> str:
        return state.plan[min(state.phase_index, len(state.plan) - 1)].name

    start = time.time()
    with _progress(state) as bar:
        state = R.search(state, R.make_evaluate(mat, searcher, rows, phase), run_dir, cfg.search.time_limit,
                         progress=bar)
    search_seconds = time.time() - start
    if not state.finished:
        print(f"time limit reached after {len(state.archive.entries)} evaluations; resume with resume={run_dir}")
        return {}
    R.write_best(run_dir, *state.archive.best())
    return _finish(cfg, run_dir, model, tok, mat, names, common, state, rows, search_seconds)


def _finish(cfg, run_dir, model, tok, mat, names, common, state, rows, search_seconds) -> dict:
    from transformers import AutoModelForCausalLM

    from eep.evaluate.evaluator import Evaluator
    from eep.export import export

    ev = cfg.evaluator
    validator = Evaluator(model, tok, names, role="validation", limit=ev.validation_limit, **common)
    best, picked = F.pick_final(state.archive, mat, validator, cfg.search.final_candidates)
    tester = Evaluator(model, tok, names, role="test", limit=ev.test_limit, **common)
    single = names[0] if len(names) == 1 else None
    value = (lambda s: F.first_metric(s, single)) if single else (lambda s: s.fitness)
    full_val, full_test = value(validator.evaluate()), value(tester.evaluate())
    with mat.applied(best):
        best_test = value(tester.evaluate())
    calibration = None if best.is_pruning else F.calibration_tokens(validator, tok, n=256)
    exported = export(model, best, run_dir / "model", tok, materializer=mat, calibration=calibration,
                      provenance={"base_model": mat.model.config._name_or_path, "method": "eep",
                                  "scores": {"test": best_test}})
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=model.dtype).to(model.device).eval()
    exported_test = value(Evaluator(reloaded, tok, names, role="test", limit=ev.test_limit, **common).evaluate())
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
        "workers": 1, "experts": {"before": mat.adapter.num_experts, "after": best.num_kept},
        "top_k": {"before": mat.adapter.top_k, "after": best.top_k},
        "parameters": {"before": F.parameter_counts(model, mat.adapter),
                       "after": F.parameter_counts(model, mat.adapter, best.num_kept)},
        "search_seconds": search_seconds, "evaluations": len(state.archive.entries), "generation": speed,
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
