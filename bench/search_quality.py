"""Does the search beat the one-shot methods? Test scores and costs over a grid of settings: ``python bench/search_quality.py``.

For each setting (model, task, E', k') every one-shot method of ``eep-compare`` runs once (its calibration as
eep-compare's default; the methods are deterministic) and each search variant runs with seeds 0, 1, 2:
``default`` (eep-search's defaults: seeded first generation, ``search.fitness`` as configured) and ``random_start``
(``search.init_from=[] search.fitness=task search.racing.slice=1.0``: the paper's random start and scoring, so what
seeding and racing add shows apart). Test score: the exported checkpoint's for the searches (a vanilla checkpoint, what a user ships), the
method's in place for the one-shot methods (pruning methods export exactly; merging ones keep their in-place
routing), both on the task's test split. Cost: forward tokens (token positions through the model during the search:
``report.json`` ``cost.forward_tokens``), distinct evaluations and seconds. Rows are appended to
``bench/results/<out>.jsonl`` as they finish (a rerun skips the rows already there), and the table (mean and standard
error over seeds) is printed and written to ``bench/results/<out>.md``.

    python bench/search_quality.py --settings mixtral                # skills-mixtral E' 2, 3, 4 on every skill + all
    python bench/search_quality.py --settings olmoe,top1             # skills-olmoe E' 4, 8; k' = 1 with all experts
    python bench/search_quality.py --settings qwen3                  # skills-qwen3 E' 16, 32 of 64
    python bench/search_quality.py --settings mixtral-e2 --variants seeded_task,seeded_agreement --seeds 0
    python bench/search_quality.py --table search_quality,search_quality_b --out search_quality_all  # one table
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from record import code, machine  # noqa: E402

SKILLS = ["add", "reverse", "sort", "copy", "lookup", "count"]
ONE_SHOT = ["frequency", "soft_activation", "reap", "enumeration", "enumeration_progressive", "m_smoe", "hc_smoe"]
VARIANTS = {
    "default": [],
    "random_start": ["search.init_from=[]", "search.fitness=task", "search.racing.slice=1.0"],
    "random_racing": ["search.init_from=[]", "search.fitness=task"],   # the paper's start, racing on
    # eep-search's default when the search issue was filed (the reference of its forward-token target)
    "issue_default": ["search.init_from=[]", "search.fitness=task", "search.racing.slice=1.0",
                      "search.prune_budget=40", "search.merge_budget=10", "search.eep.prune_crossover=0",
                      "search.eep.seeded_random=null"],
    # the paper's start with exact match read off one teacher-forced forward (+ likelihood tie-break), racing on
    "random_match": ["search.init_from=[]", "search.fitness=match+likelihood"],
    "random_match_t4": ["search.init_from=[]", "search.fitness=match+likelihood", "search.racing.top=4"],
    "random_match_s8_t4": ["search.init_from=[]", "search.fitness=match+likelihood", "search.racing.slice=0.125",
                           "search.racing.top=4"],
    "random_lengler": ["search.init_from=[]", "optimizer.prune_name=DiscreteLenglerOnePlusOne"],
    "random_portfolio": ["search.init_from=[]", "optimizer.prune_name=PortfolioDiscreteOnePlusOne"],
    "random_portfolio_t4": ["search.init_from=[]", "optimizer.prune_name=PortfolioDiscreteOnePlusOne",
                            "search.racing.top=4"],
    "random_portfolio_s8": ["search.init_from=[]", "optimizer.prune_name=PortfolioDiscreteOnePlusOne",
                            "search.racing.slice=0.125"],
    "seeded_task": ["search.fitness=task"],
    # the seeded start with the paper's strategy (no pruning crossover, a random opening of eep.population subsets)
    "seeded_paper_strategy": ["search.eep.prune_crossover=0", "search.eep.seeded_random=null"],
    "budget_240": ["search.prune_budget=200", "search.merge_budget=40"],   # twice the default's evaluations
    "budget_120": ["search.prune_budget=100", "search.merge_budget=20"],
    "budget_120_blend": ["search.prune_budget=100", "search.merge_budget=20", "search.fitness=task+likelihood"],
    "seeded_agreement": ["search.fitness=agreement"],
    "seeded_likelihood": ["search.fitness=likelihood"],
    "task_likelihood": ["search.fitness=task+likelihood"],
    "task_agreement": ["search.fitness=task+agreement"],
    # nevergrad's optimisers as the population manager, same budget, same seeded first generation
    "ng_lengler": ["optimizer.prune_name=DiscreteLenglerOnePlusOne"],
    "ng_portfolio": ["optimizer.prune_name=PortfolioDiscreteOnePlusOne"],
    "ngopt": ["optimizer.prune_name=NGOpt", "optimizer.merge_name=NGOpt"],
    "cma_merge": ["optimizer.merge_name=CMA"],
    # the merging phase's router mapping applied to the gate's rows (exports exactly) instead of the probabilities
    "gate_rows": ["search.merge_router=gate_rows"],
    # no merging phase: the default's pruning phase alone, so default minus this is what merging adds on test
    "prune_only": ["search.merge_budget=0"],
}


# group name -> (model, the expert counts E' it runs, its tasks); "<group>-e<N>" runs that group at E' = N only
GROUPS = {
    "mixtral": ("skills_mixtral", (2, 3, 4), (*(f"skills_{s}" for s in SKILLS), "skills_all")),
    "olmoe": ("skills_olmoe", (4, 8), ("skills_sort", "skills_add")),
    "qwen3": ("skills_qwen3", (16, 32), ("skills_sort", "skills_add", "skills_all")),
}


def settings_of(names: str) -> list[dict]:
    """The grid's settings by group name (comma-separated): a group of :data:`GROUPS` (``mixtral``, ``olmoe``,
    ``qwen3``), one of its expert counts (``mixtral-e2``, ``qwen3-e32``, ...), or ``top1`` (k' = 1 of all 8)."""
    out = []
    for name in names.split(","):
        group, sep, count = name.partition("-e")
        if name == "top1":
            out += [{"model": "skills_mixtral", "task": t, "num_experts": 8, "top_k": 1}
                    for t in ("skills_sort", "skills_all")]
        elif group in GROUPS and (not sep or count.isdigit()):
            model, counts, tasks = GROUPS[group]
            out += [{"model": model, "task": t, "num_experts": e, "top_k": None}
                    for e in ([int(count)] if count else counts) for t in tasks]
        else:
            named = [f"{g}-e{e}" for g, (_, counts, _) in GROUPS.items() for e in counts]
            raise SystemExit(f"--settings: unknown group {name!r}; use {', '.join(GROUPS)}, {', '.join(named)}, top1")
    return out


def overrides(setting: dict) -> list[str]:
    out = [f"model={setting['model']}", f"task={setting['task']}", f"search.num_experts={setting['num_experts']}"]
    if setting["top_k"] is not None:
        out.append(f"search.top_k={setting['top_k']}")
    if setting["task"] == "skills_all":
        out.append("compare.calibration=skills_all")
    return out


def key(setting: dict) -> str:
    k = "" if setting["top_k"] is None else f"_k{setting['top_k']}"
    return f"{setting['model']}_{setting['task']}_E{setting['num_experts']}{k}"


def compose(name: str, items: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    import eep

    with initialize_config_dir(version_base="1.3", config_dir=str(eep.conf_dir())):
        return hydra_compose(config_name=name, overrides=items)


def one_shot_rows(setting: dict, work: Path) -> list[dict]:
    """Every one-shot method at this setting, through eep-compare's own code (calibration as its default)."""
    from eep.app.compare import run as compare

    rows = compare(compose("eep_compare", [*overrides(setting), f"compare.methods=[{','.join(ONE_SHOT)}]"]),
                   work / "compare")
    return [{"setting": key(setting), "method": r.method, "seed": None, "test": r.test_score, "seconds": r.seconds,
             "forward_tokens": None, "evaluations": None, "notes": r.notes} for r in rows]


def search_row(setting: dict, variant: str, seed: int, work: Path) -> dict:
    from eep.app.search import run as search

    items = [o for o in overrides(setting) if not o.startswith("compare.")]
    folder = work / f"{variant}_{seed}"
    if (folder / "eep_config.yaml").is_file():   # a run this script was stopped in: go on with it
        items.append(f"resume={folder}")
    start = time.time()
    report = search(compose("eep_search", [*items, *VARIANTS[variant], f"seed={seed}"]), folder)
    cost = report.get("cost") or {}
    return {"setting": key(setting), "method": f"eep:{variant}", "seed": seed, "test": report["test"]["best_exported"],
            "in_place": report["test"]["best_in_place"], "full": report["test"]["full"],
            "seconds": round(report["search_seconds"], 1), "wall_seconds": round(time.time() - start, 1),
            "forward_tokens": cost.get("forward_tokens"), "evaluations": report["evaluations"],
            "fitness": report.get("fitness"), "final_kind": _final_kind(folder),
            "notes": "" if report["export"]["exact"] else "merging genome exported"}


def _final_kind(folder: Path) -> str:
    """The final pick's :attr:`eep.genome.Genome.kind` (``pruning``, ``merging``, ``merging (gate rows)``) from the
    run's best.json."""
    from eep.genome import Genome

    return Genome.from_dict(json.loads((folder / "best.json").read_text())["genome"]).kind


def table(rows: list[dict]) -> str:
    """Per setting: the full model, every method (mean +- standard error over seeds) and the verdict."""
    present = [v for v in VARIANTS if any(r["method"] == f"eep:{v}" for r in rows)]
    lines = ["| setting | full | best one-shot | " + " | ".join(f"eep {v}" for v in present) + " | verdict |",
             "|---|---|---|" + "---|" * len(present) + "---|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        full = next((r["test"] for r in mine if r["method"] == "full"), float("nan"))
        shots = [r for r in mine if r["method"] in ONE_SHOT]
        best = max(shots, key=lambda r: r["test"]) if shots else None
        cells, verdict = [], ""
        for variant in present:
            runs = [r["test"] for r in mine if r["method"] == f"eep:{variant}"]
            if not runs:
                cells.append("")
                continue
            mean = statistics.fmean(runs)
            se = statistics.stdev(runs) / math.sqrt(len(runs)) if len(runs) > 1 else 0.0
            tokens = statistics.fmean(r["forward_tokens"] or 0 for r in mine if r["method"] == f"eep:{variant}")
            cells.append(f"{mean:.3f} +- {se:.3f} ({len(runs)} seeds, {tokens / 1e6:.2f}M tok)")
            if variant == "default" and best is not None:
                margin = 0.05 if best["test"] < 0.95 * full else 0.0
                eps = 1e-9   # scores are counts of documents: a mean of equal scores must compare equal
                verdict = ("meets target" if mean + eps >= best["test"] + margin else "equal (within 1 s.e.)"
                           if mean + se + eps >= best["test"] else "short") + f" (needs >= {best['test'] + margin:.3f})"
        shot = f"{best['method']} {best['test']:.3f}" if best else ""
        lines.append(f"| {setting} | {full:.3f} | {shot} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def run_analysis(work: Path, reference: str = "random_start") -> dict:
    """From the search runs' folders: what the merging phase adds (best full search fitness of each phase, final
    pick's kind, in place vs exported test score) and the forward tokens each variant needed to reach the final
    search fitness of the ``reference`` variant with the same seed (full-fidelity rows only)."""
    runs = {}
    for report in sorted(work.glob("*/*/report.json")):
        folder = report.parent
        rows = [json.loads(line) for line in (folder / "evaluations.jsonl").read_text().splitlines()]
        rep = json.loads(report.read_text())
        full = [r for r in rows if r.get("fidelity", 1.0) == 1.0]
        best = {ph: max((r["fitness"] for r in full if r["phase"] == ph), default=None) for ph in ("prune", "merge")}
        spent, curve = (rep.get("search_full") or {}).get("forward_tokens", 0), []
        for r in rows:
            spent += r.get("forward_tokens", 0)
            if r.get("fidelity", 1.0) == 1.0:
                curve.append((spent, _task_part(r)))
        runs[(folder.parent.name, folder.name)] = {"best": best, "merging_final": _final_kind(folder) != "pruning",
                                                   "in_place": rep["test"]["best_in_place"],
                                                   "exported": rep["test"]["best_exported"], "curve": curve,
                                                   "total": (rep.get("cost") or {}).get("forward_tokens")}
    merging = [r for r in runs.values() if r["best"]["merge"] is not None and r["best"]["prune"] is not None]
    out = {"runs": len(runs), "merge_phase_gain_search": statistics.fmean(r["best"]["merge"] - r["best"]["prune"]
                                                                          for r in merging) if merging else None,
           "final_is_merging": sum(r["merging_final"] for r in runs.values()),
           "exported_minus_in_place_when_merging": [round(r["exported"] - r["in_place"], 4) for r in runs.values()
                                                    if r["merging_final"]], "tokens_to_reach": {}}
    for (setting, name), run in runs.items():
        variant, seed = name.rsplit("_", 1)
        ref = runs.get((setting, f"{reference}_{seed}"))
        if ref is None or variant == reference or not ref["curve"]:
            continue
        target = max(f for _, f in ref["curve"])
        reached = next((t for t, f in _running_best(run["curve"]) if f >= target), None)
        out["tokens_to_reach"].setdefault(variant, []).append(
            {"setting": setting, "seed": int(seed), "target": target, "tokens": reached, "reference": ref["total"],
             "ratio": None if reached is None or not ref["total"] else round(reached / ref["total"], 3)})
    return out


def _task_part(row: dict) -> float:
    """A row's search fitness without the likelihood tie-break (``task+likelihood``, ``match+likelihood``:
    ``fitness - 0.01 x likelihood``, the tasks weighted equally as in this grid), so that every variant is held to
    the reference's exact match, not to up to 0.01 of likelihood."""
    from eep.evaluate.dense import BLEND_WEIGHT

    dense = [m["likelihood"] for m in (row.get("metrics") or {}).values()
             if "likelihood" in m and len(m) > 1]   # a tie-break beside the metric, not likelihood alone
    return row["fitness"] - BLEND_WEIGHT * statistics.fmean(dense) if dense else row["fitness"]


def _running_best(curve):
    best = float("-inf")
    for tokens, fitness in curve:
        best = max(best, fitness)
        yield tokens, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="mixtral,olmoe,qwen3,top1")
    parser.add_argument("--variants", default="default,random_start")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=None, help="only these tasks of the settings (comma-separated)")
    parser.add_argument("--no-one-shot", action="store_true", help="only the search variants")
    parser.add_argument("--out", default="search_quality")
    parser.add_argument("--work", default="runs/bench_search_quality", help="run folders of the searches")
    parser.add_argument("--analyse", action="store_true", help="only the analysis of the run folders under --work")
    parser.add_argument("--reference", default="random_start", help="--analyse: the variant whose final search "
                        "fitness the others must reach (issue_default: the default when the search issue was filed)")
    parser.add_argument("--table", default=None,
                        help="only the table of these result files (comma-separated names under bench/results), "
                             "written to bench/results/<out>.md")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(line) for name in args.table.split(",")
                for line in (HERE / "results" / f"{name}.jsonl").read_text().splitlines()]
        text = table(rows)
        (HERE / "results" / f"{args.out}.md").write_text(text + "\n")
        print(text)
        return
    if args.analyse:
        result = run_analysis(Path(args.work), args.reference)
        (HERE / "results" / f"{args.out}_analysis.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "tokens_to_reach"}, indent=1))
        for variant, items in result["tokens_to_reach"].items():
            ratios = [i["ratio"] for i in items if i["ratio"] is not None]
            print(f"{variant}: reached {args.reference}'s final search fitness in {len(ratios)} of {len(items)} runs; "
                  f"median tokens ratio {statistics.median(ratios) if ratios else float('nan'):.3f}")
        return
    from eep.logs import quiet_third_party

    quiet_third_party(True)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; use {', '.join(VARIANTS)}")
    out = HERE / "results" / f"{args.out}.jsonl"
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    seen = {(r["setting"], r["method"], r["seed"]) for r in done}
    with out.open("a") as fh:
        for setting in settings_of(args.settings):
            if args.tasks and setting["task"] not in args.tasks.split(","):
                continue
            work = Path(args.work) / key(setting)
            todo = []
            if not args.no_one_shot and (key(setting), "full", None) not in seen:
                todo.append(lambda: one_shot_rows(setting, work))
            for variant in variants:
                for seed in (int(s) for s in args.seeds.split(",")):
                    if (key(setting), f"eep:{variant}", seed) not in seen:
                        todo.append(lambda v=variant, s=seed: [search_row(setting, v, s, work)])
            for job in todo:
                for row in job():
                    row["machine"], row["code"] = machine(), code()
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    done.append(row)
                    print(json.dumps({k: row[k] for k in ("setting", "method", "seed", "test", "seconds")}),
                          flush=True)
    text = table(done)
    (HERE / "results" / f"{args.out}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
