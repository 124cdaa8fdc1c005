"""eep-search: config composition, validation before heavy work, a tiny real run, resume, and the CLI's errors."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import compose_config

import eep
from eep.app import search as app
from eep.errors import UserError

TINY = ["model=skills_olmoe", "task=skills_count", "search.num_experts=8", "search.prune_budget=5",
        "search.merge_budget=2", "search.eep.population=3", "evaluator.limit=20", "evaluator.validation_limit=20",
        "evaluator.test_limit=30", "search.final_candidates=2"]


def config(overrides):
    return compose_config("eep_search", overrides)


@pytest.mark.parametrize("override, message", [
    ("search.num_experts=40", "search.num_experts=40: must be an integer between 1 and the model's 32 experts"),
    ("search.top_k=9", "search.top_k=9: must be an integer between 1 and search.num_experts=8"),
    ("search.layer_groups=7", "search.layer_groups=7: use per_layer or a number of depth groups between 1 and 4"),
    ("search.prune_budget=-1", "search.prune_budget=-1: must be an integer >= 0"),
    ("optimizer.name=NGopt", "optimizer.prune_name: unknown nevergrad optimizer 'NGopt'. Close names: NGOpt"),
    ("task.names=[skills_sorted]", "unknown lm-eval task 'skills_sorted'"),
    ("search.init_from=m_smoe", "search.init_from=m_smoe: use methods among random, frequency"),
    ("search.init_from=[reap,skipping]", "skipping is a skipping method whose result is more than a genome"),
    ("search.init_from=[hc_smoe] search.layer_groups=2", "hc_smoe gives a merging genome per layer"),
    ("search.fitness=exact", "search.fitness=exact: use one of task, likelihood, agreement, task+likelihood, "
                             "task+agreement, match+likelihood, auto"),
    ("statistics=/nonexistent/statistics.safetensors", "statistics=/nonexistent/statistics.safetensors: no such file"),
    ("search.merge_router=weights", "search.merge_router=weights: use one of probabilities, gate_rows"),
])
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, override, message):
    with pytest.raises((UserError, ValueError), match=re.escape(message)):
        app.run(config([*TINY, *override.split()]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_config_group_entry_composes():
    for group in ("model", "task", "search", "optimizer", "evaluator"):
        for entry in sorted((eep.conf_dir() / group).glob("*.yaml")):
            cfg = config([f"{group}={entry.stem}"])
            assert cfg[group] is not None
            assert entry.read_text().startswith("#"), f"{entry} must open with a comment giving a command"


def test_a_tiny_search_writes_its_outputs_and_a_finished_run_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    report = app.run(config(TINY), run_dir)
    for name in ("evaluations.jsonl", "best.json", "report.json", "report.md", "curve.png", "usage.png",
                 "eep_config.yaml",
                 "model/config.json", "model/README.md"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert len(rows) == report["evaluations"] == 7 and len({r["genome_hash"] for r in rows}) == 7
    assert report["fitness"] == "match+likelihood"   # search.fitness=auto on a plain exact-match generation task
    assert all(set(r["metrics"]["skills_count"]) == {"exact_match_forced", "likelihood"} for r in rows)
    assert report["test"]["best_in_place"] == report["test"]["best_exported"] or not report["export"]["exact"]
    assert 0 <= report["test"]["full"] <= 1 and report["experts"] == {"before": 32, "after": 8}
    gen = report["generation"]
    assert gen["exported"]["weight_bytes"] < gen["full"]["weight_bytes"] and gen["full"]["tokens_per_second"] > 0
    saved = report["savings"]   # 8 of 32 experts: the parameters counted from the config are what the file holds
    assert saved["parameter_bytes"]["exported"] == 4 * report["parameters"]["after"]["total"]
    for side in ("full", "exported"):   # the files add a safetensors header (a few KiB) to the float32 weights
        assert 0 < saved["checkpoint_bytes"][side] - saved["parameter_bytes"][side] < 2**16
    assert all(ratio > 0 for ratio in saved["speed_vs_full"].values())
    assert "saved: checkpoint files" in (run_dir / "report.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert app.run(config([*TINY, f"resume={run_dir}"]), run_dir) is None
    assert "is finished; nothing to do" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_a_gate_rows_search_merges_router_rows_and_exports_its_merging_genomes_exactly(tmp_path, capsys):
    """``search.merge_router=gate_rows``: the merging phase's genomes carry ``gate_rows`` (pruning ones do not),
    eep-export writes one without calibration, and the reloaded checkpoint computes what was scored in place."""
    import torch
    from transformers import AutoModelForCausalLM

    from eep.app.session import Session
    from eep.cli.export import find_genome, main as export_main

    run_dir = tmp_path / "run"
    report = app.run(config([*TINY, "search.merge_router=gate_rows"]), run_dir)
    assert report["export"]["exact"] and report["test"]["best_in_place"] == report["test"]["best_exported"]
    rows = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    merged = [r for r in rows if r["phase"] == "merge" and "genome" in r]
    assert merged and all(r["genome"]["gate_rows"] for r in merged)
    assert all("gate_rows" not in r["genome"] for r in rows if r["phase"] != "merge" and "genome" in r)
    best = max(merged, key=lambda r: r["fitness"])["genome_hash"]
    assert export_main([str(run_dir), "--genome", best, "--out", str(tmp_path / "merged")]) == 0
    assert "(exact)" in capsys.readouterr().out
    session = Session(config(TINY), search=False)
    batch = session.tok(["a b c d e f", "9 8 7 6 5 4 3"], return_tensors="pt", padding=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad(), session.mat.applied(find_genome(run_dir, best)):
        in_place = session.model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, in_place, atol=1e-5, rtol=0)


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "eep.cli.search", *TINY, "search.num_experts=33",
                          f"hydra.run.dir={tmp_path / 'r'}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert "eep-search: error: search.num_experts=33" in out.stderr and "Traceback" not in out.stderr


def test_a_killed_run_resumes_to_the_same_genomes_and_best(tmp_path, monkeypatch):
    """Dies mid-candidate (as under SIGKILL: the candidate in flight is lost), then ``resume=<folder>``. The search
    fitness's calls (``match+likelihood``, one teacher-forced pass): the full model (the baseline), the five distinct
    genomes of the first generation (REAP's, soft activation's, frequency's and both enumerations', one batch), then
    the strategy's candidates on racing's slice: the seventh call dies in the pruning phase's second batch, after
    the first generation was committed."""
    from eep.evaluate.dense import DenseFitness

    tiny = [o if not o.startswith("search.prune_budget=") else "search.prune_budget=8" for o in TINY]
    full = tmp_path / "full"
    app.run(config(tiny), full)
    real, calls = DenseFitness.evaluate, {"n": 0}

    def dying(self):
        if self.role == "search":
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt
        return real(self)

    killed = tmp_path / "killed"
    monkeypatch.setattr(DenseFitness, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        app.run(config(tiny), killed)
    monkeypatch.undo()
    assert len((killed / "evaluations.jsonl").read_text().splitlines()) == 5
    with pytest.raises(UserError, match="resume_force=true"):
        app.run(config([*tiny, "seed=5", f"resume={killed}"]), tmp_path / "ignored")
    app.run(config([*tiny, f"resume={killed}"]), killed)

    def hashes(folder):
        return [json.loads(line)["genome_hash"] for line in (folder / "evaluations.jsonl").read_text().splitlines()]

    assert hashes(killed) == hashes(full)
    assert json.loads((killed / "best.json").read_text()) == json.loads((full / "best.json").read_text())


def test_the_run_hash_ignores_only_where_it_runs_and_how_much_it_prints():
    from eep.app.runfolder import config_hash

    base = config_hash(config(TINY))
    same = [["verbose=true"], ["evaluator.workers=2"], ["search.max_failed_candidates=9"], ["resume_force=true"]]
    assert all(config_hash(config([*TINY, *extra])) == base for extra in same)
    changed = [["seed=5"], ["search.num_experts=4"], ["evaluator.limit=7"], ["task=skills_add"]]
    assert len({base, *(config_hash(config([*TINY, *extra])) for extra in changed)}) == 1 + len(changed)


PAPER_TASKS = ["sglue_rte", "wic", "wsc", "boolq", "cb", "record", "drop", "squad_completion", "squadv2", "copa",
               "multirc"]
PAPER_SHAPES = {"mistralai/Mixtral-8x7B-Instruct-v0.1": (32, 8, 2), "Qwen/Qwen1.5-MoE-A2.7B": (24, 60, 4)}


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (eep.conf_dir() / "experiment").glob("*.yaml")))
def test_paper_presets_compose_and_validate_offline(experiment):
    """The model itself needs the hub: its published shape (layers, experts, top-k) stands in for its config."""
    from eep.evaluate.reference import manager_for
    from eep.settings import check_optimizers, check_settings

    manager_for(PAPER_TASKS)  # every paper task is a task of lm-eval itself
    for task in PAPER_TASKS:
        cfg = config([f"+experiment={experiment}", f"task={task}"])
        assert cfg.task.names == [task] and cfg.model.device == "cuda"
        assert cfg.search.prune_budget == 100 and cfg.search.merge_budget == 300
        check_optimizers(cfg)
    kept, top_k, groups = check_settings(cfg, *PAPER_SHAPES[cfg.model.path])
    assert kept == cfg.search.num_experts and len(groups) == PAPER_SHAPES[cfg.model.path][0]


def test_eep_export_rewrites_a_runs_genomes(tmp_path, capsys):
    from eep.cli.export import main as export_main

    run_dir = tmp_path / "run"
    app.run(config(TINY), run_dir)
    rows = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert export_main([str(run_dir), "--out", str(tmp_path / "best")]) == 0
    assert (tmp_path / "best" / "config.json").is_file()
    assert export_main([str(run_dir), "--genome", rows[0]["genome_hash"]]) == 0
    assert (run_dir / f"export-{rows[0]['genome_hash']}" / "model.safetensors").is_file()
    assert export_main([str(run_dir), "--genome", "0000"]) == 2
    assert "genome 0000 is not among the evaluations" in capsys.readouterr().err
    assert export_main([str(tmp_path)]) == 2


def test_cli_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    """A real ``eep-search`` process is SIGKILLed after a few evaluations; ``eep-search resume=<folder>`` finishes
    it with the same evaluated genomes and best as an uninterrupted run."""
    import signal
    import time

    full = tmp_path / "full"
    app.run(config(TINY), full)
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "eep.cli.search", *TINY]
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={killed}"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows, deadline = killed / "evaluations.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if rows.exists() and len(rows.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = subprocess.run([sys.executable, "-m", "eep.cli.search", f"resume={killed}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True)  # the documented resume: no other argument
    assert done.returncode == 0, done.stderr[-2000:]

    def hashes(folder):
        return [json.loads(line)["genome_hash"] for line in (folder / "evaluations.jsonl").read_text().splitlines()]

    assert hashes(killed) == hashes(full)
    assert json.loads((killed / "best.json").read_text()) == json.loads((full / "best.json").read_text())


def test_cli_multirun_sweep_writes_one_finished_run_per_job_under_runs(tmp_path):
    """``eep-search -m seed=1,2`` runs two searches with the basic launcher, in runs/multirun/<date>/<time>/<n>."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    small = [*TINY, "search.prune_budget=3", "search.merge_budget=0", "search.final_candidates=1"]
    out = subprocess.run([sys.executable, "-m", "eep.cli.search", "-m", "seed=1,2", *small], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    reports = sorted((tmp_path / "runs" / "multirun").glob("*/*/*/report.json"))
    assert [p.parent.name for p in reports] == ["0", "1"]
    assert [json.loads(p.read_text())["seed"] for p in reports] == [1, 2]
    assert out.stdout.count("eep (exported)") == 2


def method_genomes(cfg, methods, num_kept=8, top_k=4):
    """Each method's genome, computed independently of the app: ``eep.methods.compute`` on the search split's
    first ``evaluator.limit`` requests."""
    from eep.materialize import Materializer
    from eep.methods import calibration_batch, compute
    from eep.models import load_model, model_config

    model, tok = load_model(model_config(cfg.model.name.replace("-", "_")))
    calibration = calibration_batch(model, tok, app.make_evaluator(cfg, model, tok, "search"), n=cfg.evaluator.limit)
    mat = Materializer(model)
    return {m: compute(m, model, mat, calibration, num_kept=num_kept, top_k=top_k).genome for m in methods}


def test_the_first_generation_holds_the_statistics_genomes(tmp_path):
    """The default ``search.init_from``: REAP's, soft activation's and frequency's genomes (one calibration pass)
    and both enumerations' are the first evaluations, in that order, duplicates once (enumeration by greedy
    elimination: C(32, 8) subsets per layer are too many, its 492 greedy steps are not); the rest of the budget is
    the strategy's (random subsets, then children). The statistics are saved, and a run given ``statistics=<file>``
    starts from the same genomes without calibrating."""
    cfg = config(TINY)
    seeds = ["reap", "soft_activation", "frequency", "enumeration", "enumeration_progressive"]
    assert list(cfg.search.init_from) == seeds
    report = app.run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    # the cost: every evaluation's forward tokens (generation: prompts plus generated steps, which vary with the
    # candidate: a broken one may generate to the length limit; racing's slice, a quarter of the documents: fewer)
    full = [r["forward_tokens"] for r in rows if r["fidelity"] == 1.0]
    assert all(0 < r["forward_tokens"] < min(full) for r in rows if r["fidelity"] < 1.0)
    assert report["cost"] == {"forward_tokens": sum(r["forward_tokens"] for r in rows) +
                              report["search_full"]["forward_tokens"], "candidates": 7,
                              "seconds": round(report["search_seconds"], 2)}
    want = list(dict.fromkeys(g.content_hash() for g in method_genomes(cfg, seeds).values()))
    assert [r["genome_hash"] for r in rows[:len(want)]] == want and all(r["phase"] == "prune" for r in rows[:5])
    assert len(rows) == 7 and len({r["genome_hash"] for r in rows}) == 7
    stats = tmp_path / "run" / "statistics.safetensors"
    again = tmp_path / "again"
    import eep.methods.expert_scores as scores

    calls = []
    real = scores.expert_scores
    scores.expert_scores = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        app.run(config([*TINY, f"statistics={stats}", "search.prune_budget=3", "search.merge_budget=0"]), again)
    finally:
        scores.expert_scores = real
    rows_again = [json.loads(line) for line in (again / "evaluations.jsonl").read_text().splitlines()]
    assert not calls and [r["genome_hash"] for r in rows_again[:len(want)]] == want


def test_statistics_seed_depth_groups_and_another_count(tmp_path):
    """With ``search.layer_groups=2`` each group keeps the experts of highest score summed over its two layers;
    at another E' the saved statistics give that count's top experts."""
    import torch

    from eep.methods.expert_scores import load_scores

    app.run(config([*TINY, "search.init_from=[soft_activation]", "search.prune_budget=2", "search.merge_budget=0",
                    "search.layer_groups=2"]), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    scores, info = load_scores(tmp_path / "run" / "statistics.safetensors", 4, 32)
    assert info["requests"] == 20 and set(scores) == {"frequency", "soft_activation", "reap"}
    soft = scores["soft_activation"]
    kept = [sorted(torch.sort(soft[list(g)].double().sum(0), descending=True, stable=True).indices[:8].tolist())
            for g in ((0, 1), (2, 3))]
    assert rows[0]["genome"]["kept"] == kept and rows[0]["genome"]["groups"] == [[0, 1], [2, 3]]
    cfg = config([*TINY, "search.num_experts=4", "search.top_k=2"])
    single = method_genomes(cfg, ["soft_activation"], num_kept=4, top_k=2)["soft_activation"]
    per_layer = [sorted(torch.sort(row.double(), descending=True, stable=True).indices[:4].tolist()) for row in soft]
    assert [single.kept(i) for i in range(4)] == per_layer


def test_the_blended_fitness_is_the_task_metric_plus_a_hundredth_of_the_dense_one():
    """``search.fitness=task+likelihood``: exact match plus 0.01 x likelihood, from the same documents in the same
    process (so equal to the last bit), both metrics kept, both passes' forward tokens counted."""
    from eep.app.session import Session
    from eep.evaluate.dense import BLEND_WEIGHT, DenseFitness

    session = Session(config([*TINY, "search.fitness=task+likelihood"]))
    blend, task = session.searcher.evaluate(), session.search_tasks.evaluate()
    dense = DenseFitness(session.search_tasks, "likelihood", batch_size=session.cfg.evaluator.batch_size).evaluate()
    assert BLEND_WEIGHT == 0.01 and 0.0 < dense.fitness <= 1.0
    assert blend.fitness == task.fitness + BLEND_WEIGHT * dense.fitness
    assert set(blend.metrics["skills_count"]) == {"exact_match", "likelihood"}
    assert blend.forward_tokens == task.forward_tokens + dense.forward_tokens > task.forward_tokens


@pytest.mark.parametrize("fitness", ["likelihood", "agreement"])
def test_a_dense_fitness_scores_the_full_model_and_ranks_candidates(tmp_path, fitness):
    """``search.fitness``: the full model scores 1 on agreement (it is its own reference) and near 1 on likelihood;
    a candidate keeping 4 of 32 experts scores lower; the final pick and the report stay on the task's metric."""
    from eep.app.session import Session
    from eep.genome import Genome

    cfg = config([*TINY, f"search.fitness={fitness}"])
    session = Session(cfg)
    full = session.searcher.evaluate()
    assert full.error is None and (full.fitness == pytest.approx(1.0, abs=1e-9) if fitness == "agreement"
                                   else 0.9 < full.fitness <= 1.0)
    assert list(full.metrics) == ["skills_count"] and list(full.metrics["skills_count"]) == [fitness]
    poor = session.score(Genome.pruning([[0, 1, 2, 3]] * 4, 32, 4))
    assert 0.0 <= poor.fitness < full.fitness - 0.05
    report = app.run(config([*TINY, f"search.fitness={fitness}", "search.init_from=[]"]), tmp_path / "run")
    assert report["search_full"]["fitness"] == pytest.approx(full.fitness)
    rows = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    assert all(list(r["metrics"]["skills_count"]) == [fitness] for r in rows)
    picked = report["validation_candidates"]  # re-scored on the task's own metric (exact match) to pick
    assert report["validation"]["best_in_place"] == max(c["validation"] for c in picked)
    assert {c["genome_hash"] for c in picked} <= {r["genome_hash"] for r in rows}


def test_a_run_started_before_merge_router_resumes_with_the_probability_rule():
    """``search.merge_router`` is newer than some run folders: a saved config without it, and a pickled state
    without ``gate_rows``, go on with the rule they were started with (``W_RM`` on the probabilities)."""
    import pickle

    from omegaconf import open_dict

    from eep.app.runfolder import new_state
    from eep.genome import Genome

    template = Genome.identity(4, 32, 4)
    cfg = config(TINY)
    assert cfg.search.merge_router == "gate_rows" and new_state(cfg, template, 1).gate_rows
    with open_dict(cfg):
        del cfg.search["merge_router"]
    state = new_state(cfg, template, 1)
    assert state.gate_rows is False
    del state.__dict__["gate_rows"]   # as pickled before the field existed
    assert pickle.loads(pickle.dumps(state)).gate_rows is False
