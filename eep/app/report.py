"""What a finished search reports: ``report.json`` / ``report.md``, ``curve.png``, ``usage.png`` and stdout's table."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from eep.files import write_atomic

SPEED_ROUNDS = 3   # interleaved rounds timing the full and exported models (report.json ``generation``, ``savings``)


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (eep only writes image files: no display, no GUI toolkit probed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(rows: list[dict], path: Path) -> None:
    """Search fitness against distinct evaluations, one colour per phase, with the running best."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    best, xs, ys = float("-inf"), [], []
    for i, row in enumerate(rows, 1):
        best = max(best, row["fitness"])
        xs.append(i)
        ys.append(best)
    for phase, colour in (("prune", "tab:blue"), ("merge", "tab:orange")):
        pts = [(i, r["fitness"]) for i, r in enumerate(rows, 1) if r["phase"] == phase]
        if pts:
            ax.scatter(*zip(*pts), s=10, color=colour, label=f"{phase} candidates")
    ax.plot(xs, ys, color="black", label="best so far")
    ax.set_xlabel("distinct evaluations")
    ax.set_ylabel("search fitness")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, report: dict) -> None:
    write_atomic(run_dir / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    t = report["test"]
    lines = [f"# eep-search report: {report['task']}", "",
             f"Model `{report['model']}`, {report['experts']['before']} -> {report['experts']['after']} experts per "
             f"MoE layer, top-{report['top_k']['before']} -> top-{report['top_k']['after']}.", "",
             "| | test | validation | experts | parameters |", "|---|---|---|---|---|",
             f"| full | {t['full']:.4f} | {report['validation']['full']:.4f} | {report['experts']['before']} | "
             f"{report['parameters']['before']['total']:,} |",
             f"| best (in place) | {t['best_in_place']:.4f} | {report['validation']['best_in_place']:.4f} | "
             f"{report['experts']['after']} | {report['parameters']['after']['total']:,} |",
             f"| best (exported) | {t['best_exported']:.4f} | | {report['experts']['after']} | |", "",
             f"- test split: {report['test_split']}, limit {report['test_limit']}",
             f"- distinct evaluations: {report['evaluations']}, search time {report['search_seconds']:.0f} s, "
             f"{(report.get('cost') or {}).get('forward_tokens', 0):,} forward tokens (search fitness: "
             f"{report.get('fitness', 'task')})",
             f"- greedy generation: full {report['generation']['full']['tokens_per_second']:.0f} tokens/s, exported "
             f"{report['generation']['exported']['tokens_per_second']:.0f} tokens/s; weights "
             f"{report['generation']['full']['weight_bytes'] / 2**20:.1f} -> "
             f"{report['generation']['exported']['weight_bytes'] / 2**20:.1f} MiB",
             *_saved_lines(report.get("savings")),
             f"- best genome: `{report['best_hash']}` (exact export: {report['export']['exact']})"]
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def _mib(value) -> str:
    return "?" if value is None else f"{value / 2**20:.1f} MiB"


def _saved_lines(saved: dict | None) -> list[str]:
    """report.md's lines on what the export saves (reports written before ``savings`` existed have none)."""
    if not saved:
        return []
    files, speed = saved["checkpoint_bytes"], saved["speed_vs_full"]
    return [f"- saved: checkpoint files {_mib(files['full'])} -> {_mib(files['exported'])}; exported model's speed "
            f"over the full model's on this machine: generation {speed['generation']:.2f}x, prefill "
            f"{speed['prefill']:.2f}x (one run: timings of small models vary by about 10%)"]


def first_metric(score, task: str) -> float:
    """The task's first metric from a Score (the value lm-eval reports)."""
    return next(iter(score.metrics[task].values()))


def reported_value(score, names: list[str]) -> float:
    """What reports show for a Score: the task's first metric for a single task, else the weighted fitness."""
    return first_metric(score, names[0]) if len(names) == 1 else score.fitness



def plot_usage(before, after, path: Path) -> None:
    """Two heat maps, MoE layers x expert slots: routing shares of the full model and of the chosen candidate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, data, title in zip(axes, (before, after), ("full model", "chosen candidate")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"expert usage: {title}")
        ax.set_xlabel("expert slot")
        ax.set_yticks(range(data.shape[0]))
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of top-k selections")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def measurements(session, best, reloaded, validator, run_dir: Path) -> dict:
    """Expert usage before and after (``usage.png``) on 32 validation documents, and the speed of the full model and
    the exported checkpoint (``reloaded``) on them: greedy generation on their prompts, prefill on the documents,
    medians over ``SPEED_ROUNDS`` interleaved rounds (full, exported, full, ...)."""
    from eep.evaluate.calibration import calibration_tokens
    from eep.evaluate.measure import expert_usage, generation_speed, prefill_speed

    model, tok, mat = session.model, session.tok, session.mat
    batch = calibration_tokens(validator, tok, n=32)
    with mat.applied(best):
        usage_after = expert_usage(model, mat.adapter, batch)
    plot_usage(expert_usage(model, mat.adapter, batch), usage_after, run_dir / "usage.png")
    prompts = calibration_tokens(validator, tok, n=32, padding_side="left", prompts_only=True)
    models = {"full": model, "exported": reloaded}
    rounds = {name: [] for name in models}
    for _ in range(SPEED_ROUNDS):   # interleaved: a change of the machine's load falls on both models alike
        for name, m in models.items():
            rounds[name].append({**generation_speed(m, prompts), "prefill_tokens_per_second": prefill_speed(m, batch)})
    return {name: {**runs[-1], **{key: statistics.median(r[key] for r in runs)
                                  for key in ("tokens_per_second", "prefill_tokens_per_second")}}
            for name, runs in rounds.items()}


def savings(model, export_folder, speed: dict) -> dict:
    """What the export saves, measured: checkpoint bytes (weight files; the full model's where it was loaded from a
    local folder) and the exported model's generation and prefill speed over the full model's (one run)."""
    from eep.evaluate.measure import checkpoint_bytes

    full, exported = speed["full"], speed["exported"]
    return {"checkpoint_bytes": {"full": checkpoint_bytes(getattr(model, "name_or_path", None)),
                                 "exported": checkpoint_bytes(export_folder)},
            "parameter_bytes": {"full": full["weight_bytes"], "exported": exported["weight_bytes"]},
            "speed_vs_full": {"generation": exported["tokens_per_second"] / full["tokens_per_second"],
                              "prefill": exported["prefill_tokens_per_second"] / full["prefill_tokens_per_second"]}}


def search_report(cfg, session, state, best, picked: dict, full: dict, exported, search: dict, tester,
                  speed: dict) -> dict:
    """``report.json``'s content: test and validation scores of the full model (``full``), the candidate in place
    and exported (``exported``: the ExportResult), experts, parameters, speed, search cost and versions."""
    from eep.app.session import fitness_kind
    from eep.evaluate.measure import parameter_counts

    names = list(cfg.task.names)
    single = names[0] if len(names) == 1 else None
    model, adapter = session.model, session.mat.adapter

    def number(value):
        return None if value is None or value != value else value   # rescore's NaN: the evaluation raised

    return {
        "task": single or names, "model": str(cfg.model.path or cfg.model.name),
        "test_split": tester.plans[next(iter(tester.plans))]["test"].name, "test_limit": cfg.evaluator.test_limit,
        "test": {"full": full["test"], "best_in_place": number(exported.in_place_score),
                 "best_exported": number(exported.exported_score)},
        "validation": {"full": full["validation"], "best_in_place": next(iter(picked["metrics"][single].values()))
                       if single else picked["fitness"]},
        "workers": search["workers"], "worker_restarts": search["worker_restarts"],
        "experts": {"before": adapter.num_experts, "after": best.num_kept},
        "top_k": {"before": adapter.top_k, "after": best.top_k},
        "parameters": {"before": parameter_counts(model, adapter),
                       "after": parameter_counts(model, adapter, best.num_kept)},
        "search_full": state.extra.get("baseline"), "search_seconds": search["search_seconds"],
        "cost": search.get("cost"), "fitness": fitness_kind(cfg, tester),
        "evaluations": len(state.archive.entries), "generation": speed,
        "savings": savings(model, exported.folder, speed),
        "best_hash": best.content_hash(), "validation_candidates": picked["candidates"],
        "export": {"exact": exported.exact, "router_top_k_overlap": exported.router_top_k_overlap},
        "seed": cfg.seed, "versions": state.extra.get("versions"),
    }


def print_summary(report: dict) -> None:
    """The results table on stdout: full model, candidate in place and exported (test score, experts, params)."""
    p = report["parameters"]
    t = {k: float("nan") if v is None else v for k, v in report["test"].items()}
    print(f"\n{report['task']} (test split, {report['test_limit'] or 'all'} docs)")
    print(f"{'':<18}{'test':>8}{'experts':>9}{'parameters':>13}")
    print(f"{'full':<18}{t['full']:>8.4f}{report['experts']['before']:>9}{p['before']['total']:>13,}")
    print(f"{'eep (in place)':<18}{t['best_in_place']:>8.4f}{report['experts']['after']:>9}"
          f"{p['after']['total']:>13,}")
    print(f"{'eep (exported)':<18}{t['best_exported']:>8.4f}{report['experts']['after']:>9}"
          f"{p['after']['total']:>13,}")


class Progress:
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
