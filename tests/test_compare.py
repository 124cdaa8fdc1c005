"""eep-compare: methods and counts checked before the model loads, a small real comparison's values, and a resume
after a real SIGKILL that ends with the uninterrupted run's table."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import compose_config

from eep.app import compare
from eep.errors import UserError

SMALL = ["model=skills_mixtral", "task=skills_count_mc", "evaluator.limit=20", "evaluator.validation_limit=20",
         "evaluator.test_limit=40", "search.prune_budget=4", "search.merge_budget=0", "search.eep.population=3",
         "search.final_candidates=1", "compare.calibration_docs=16", "compare.random_seeds=2"]
# the comparison the resume test kills and resumes: a search long enough to be killed inside (8 evaluations)
RESUMED = [*SMALL, "compare.methods=[frequency,random,eep]", "compare.num_experts=[4,6]", "search.prune_budget=8",
           "search.eep.population=4"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def config(overrides):
    return compose_config("eep_compare", overrides)


def table_of(run_dir, drop=("seconds", "speed_vs_full")):   # timings differ from run to run
    with (run_dir / "compare.csv").open(newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted comparison of ``RESUMED``: its folder and rows."""
    run_dir = tmp_path_factory.mktemp("reference") / "c"
    return run_dir, compare.run(config(RESUMED), run_dir)


@pytest.fixture(scope="module")
def shipped():
    from eep.materialize import Materializer
    from eep.models import ModelConfig, load_model

    model, tok = load_model(ModelConfig(name="skills-mixtral"))
    return model, tok, Materializer(model)


def score_here(shipped, genome=None):
    """The test-split score of the shipped model (with ``genome`` applied) from an Evaluator built here."""
    from eep.evaluate.evaluator import Evaluator

    model, tok, mat = shipped
    evaluator = Evaluator(model, tok, ["skills_count_mc"], role="test", limit=40, batch_size=64)
    if genome is None:
        return evaluator.evaluate().metrics["skills_count_mc"]["acc"]
    with mat.applied(genome):
        return evaluator.evaluate().metrics["skills_count_mc"]["acc"]




@pytest.mark.parametrize("override, message", [
    ("compare.methods=[frequency,magic]", "compare.methods: unknown method 'magic'; valid: eep, enumeration"),
    ("compare.num_experts=[4,9]", "search.num_experts=9: must be an integer between 1 and the model's 8 experts"),
    ("compare.calibration=wiki", "compare.calibration=wiki: use one of task, skills_all"),
])
def test_bad_compare_settings_are_refused_before_the_model_loads(tmp_path, override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        compare.run(config([*SMALL, override]), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_every_method_is_compared_by_default():
    from eep.methods import METHODS

    assert compare.methods_of(config(SMALL)) == list(compare.all_methods())
    assert set(compare.all_methods()) == {*METHODS, "eep"}


def test_a_small_comparison_writes_table_csv_and_plot_with_the_scores_measured_independently(reference, shipped):
    from eep.genome import Genome

    run_dir, rows = reference
    assert [(r.method, r.num_experts) for r in rows] == [
        ("full", 8), ("frequency", 4), ("random", 4), ("eep", 4), ("frequency", 6), ("random", 6), ("eep", 6)]
    table = table_of(run_dir, drop=())
    assert [(t["method"], int(t["num_experts"]), float(t["test_score"])) for t in table] == [
        (r.method, r.num_experts, r.test_score) for r in rows]
    by = {(r.method, r.num_experts): r for r in rows}
    # the full model's row is the shipped model's test accuracy on the same 40 documents
    assert by["full", 8].test_score == score_here(shipped)
    # random: the mean of its seeds, each the score of the subset its seed draws (reproducible by seed)
    model, _, mat = shipped
    for kept in (4, 6):
        r = by["random", kept]
        assert r.runs == 2 and r.test_std == pytest.approx(abs(r.scores[0] - r.scores[1]) / 2 ** 0.5)
        assert r.test_score == pytest.approx(sum(r.scores) / 2)
        for seed, value in enumerate(r.scores):
            draw = torch.rand(len(mat.layers), 8, generator=torch.Generator().manual_seed(seed))
            genome = Genome.pruning(draw.topk(kept, dim=1).indices.sort(dim=1).values.tolist(), 8, 2)
            assert value == score_here(shipped, genome)
    # eep: the search run's own report, and its best genome scored here
    for kept in (4, 6):
        report = json.loads((run_dir / f"eep_E{kept}" / "report.json").read_text())
        best = Genome.from_dict(json.loads((run_dir / f"eep_E{kept}" / "best.json").read_text())["genome"])
        assert report["evaluations"] == 8 and best.num_kept == kept
        assert by["eep", kept].test_score == report["test"]["best_in_place"] == score_here(shipped, best)
        assert by["eep", kept].notes == f"search run: eep_E{kept}/, 8 evaluations"
    assert (run_dir / "compare.png").stat().st_size > 0 and "| frequency | 4 |" in (run_dir / "compare.md").read_text()
    # bytes: the shipped checkpoint's file for the full model, the search's export, a count from the shapes otherwise
    from eep.evaluate.measure import checkpoint_bytes, parameter_counts

    assert (by["full", 8].bytes, by["full", 8].bytes_from) == (checkpoint_bytes(model.name_or_path), "checkpoint")
    for kept in (4, 6):
        assert by["eep", kept].bytes == checkpoint_bytes(run_dir / f"eep_E{kept}" / "model")
        assert by["frequency", kept].bytes == 4 * parameter_counts(model, mat.adapter, kept)["total"]
    assert by["frequency", 4].bytes < by["frequency", 6].bytes < by["full", 8].bytes
    assert all(r.speed_vs_full > 0 for r in rows) and by["full", 8].speed_vs_full == 1.0


def test_statistics_of_a_search_run_give_the_same_rows_without_calibrating(tmp_path, reference, monkeypatch):
    """``statistics=<file>`` (a search run's ``statistics.safetensors``, calibrated on the same 16 requests of the
    search split as the comparison's own calibration): frequency's row at E'=4 and 6 equals the one computed from a
    fresh calibration pass, and no calibration pass runs for it."""
    import eep.methods.registry as registry
    from eep.app import search

    run = tmp_path / "search"
    search.run(compose_config("eep_search", [*SMALL[:-2], "evaluator.limit=16", "search.init_from=[frequency]",
                                             "search.prune_budget=1", "search.final_candidates=1"]), run)
    real, computed = registry.compute, []
    monkeypatch.setattr(registry, "compute", lambda name, *a, **k: computed.append(name) or real(name, *a, **k))
    monkeypatch.setattr("eep.methods.compute", registry.compute)
    rows = compare.run(config([*RESUMED, "compare.methods=[frequency]", f"statistics={run / 'statistics.safetensors'}"]),
                       tmp_path / "c")
    want = {(r.num_experts, r.test_score) for r in reference[1] if r.method == "frequency"}
    assert {(r.num_experts, r.test_score) for r in rows if r.method == "frequency"} == want
    assert "frequency" not in computed


def test_the_search_rows_reuse_the_comparisons_model(tmp_path, monkeypatch):
    """An eep row's search runs on the model eep-compare loaded (one load in all, not one per search: a second copy
    of a large model may not fit), restored to the original weights before and after; the full row is still the
    full model's and the search's own report says what it scored (auto fitness falls back to task+likelihood on
    this multiple-choice task)."""
    import eep.models

    real, loads = eep.models.load_model, []
    monkeypatch.setattr(eep.models, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    rows = compare.run(config([*SMALL, "compare.methods=[eep,frequency]", "compare.num_experts=[4]"]),
                       tmp_path / "c")
    assert len(loads) == 1 and [r.method for r in rows] == ["full", "eep", "frequency"]
    report = json.loads((tmp_path / "c" / "eep_E4" / "report.json").read_text())
    assert report["fitness"] == "task+likelihood" and report["test"]["full"] == rows[0].test_score
    assert rows[1].test_score == report["test"]["best_in_place"]


def test_frequency_keeping_every_expert_is_the_full_model(tmp_path):
    rows = compare.run(config([*SMALL, "compare.methods=[frequency]", "compare.num_experts=[8]"]), tmp_path / "c")
    assert [(r.method, r.num_experts, r.top_k) for r in rows] == [("full", 8, 2), ("frequency", 8, 2)]
    assert rows[1].test_score == rows[0].test_score


def test_a_sigkilled_comparison_resumes_to_the_uninterrupted_table(tmp_path, reference, capsys):
    """SIGKILL while the first search sub-run is evaluating; the resumed run keeps the finished rows, resumes the
    search as the same run and ends with the uninterrupted run's compare.csv (all but its seconds)."""
    run_dir = tmp_path / "c"
    cmd = [sys.executable, "-m", "eep.cli.compare"]
    proc = subprocess.Popen([*cmd, *RESUMED, f"hydra.run.dir={run_dir}"], env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    evaluations = run_dir / "eep_E4" / "evaluations.jsonl"
    deadline = time.monotonic() + 120
    while not (evaluations.exists() and evaluations.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the first search never started"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (run_dir / "eep_E4" / "report.json").exists() and not (run_dir / "compare.csv").exists()
    kept = compare.load_rows(run_dir / "compare.jsonl")
    assert [(r.method, r.num_experts) for r in kept] == [("full", 8), ("frequency", 4), ("random", 4)]

    # a changed config is refused, and changes nothing
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    with pytest.raises(UserError, match="resume_force=true"):
        compare.run(config([*RESUMED, f"resume={run_dir}", "compare.random_seeds=3"]), tmp_path / "unused")
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before

    out = subprocess.run([*cmd, f"resume={run_dir}"], env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming the search run" in out.stderr and "resuming: 3 finished rows kept" in out.stderr
    ref_dir, _ = reference
    assert table_of(run_dir) == table_of(ref_dir)
    # the finished rows were kept, not recomputed (their seconds too); the search is the uninterrupted one's
    assert compare.load_rows(run_dir / "compare.jsonl")[:3] == kept
    for n in (4, 6):
        hashes = [[json.loads(line)["genome_hash"] for line in (d / f"eep_E{n}" / "evaluations.jsonl").open()]
                  for d in (run_dir, ref_dir)]
        assert hashes[0] == hashes[1] and len(hashes[0]) == 8

    # resumed once finished: says so and changes nothing
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    capsys.readouterr()
    assert compare.run(config([*RESUMED, f"resume={run_dir}"]), tmp_path / "unused") is None
    assert f"comparison {run_dir} is finished; nothing to do" in capsys.readouterr().out
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


def test_a_search_stopped_at_its_time_limit_stops_the_comparison_resumably(tmp_path, capsys):
    """The random start (``search.init_from=[]``): with the default seeds the first generation, one batch, would
    fill this 4-evaluation budget before the time limit is checked (it is checked between batches)."""
    run_dir = tmp_path / "c"
    stopped = [*SMALL, "compare.methods=[frequency,eep]", "search.time_limit=0.000001", "search.init_from=[]"]
    assert compare.run(config(stopped), run_dir) is None
    assert f"resume with resume={run_dir}" in capsys.readouterr().out
    assert not (run_dir / "compare.csv").exists() and not (run_dir / "eep_E4" / "report.json").exists()
    assert [r.method for r in compare.load_rows(run_dir / "compare.jsonl")] == ["full", "frequency"]
    # the time limit is part of the run's config: lifting it is a change, accepted with resume_force=true
    with pytest.raises(UserError, match="resume_force=true"):
        compare.run(config([*SMALL, "compare.methods=[frequency,eep]", "search.init_from=[]", f"resume={run_dir}"]),
                    run_dir)
    rows = compare.run(config([*SMALL, "compare.methods=[frequency,eep]", "search.init_from=[]", f"resume={run_dir}",
                               "resume_force=true"]), run_dir)
    assert [r.method for r in rows] == ["full", "frequency", "eep"] and rows[2].notes.endswith(", 4 evaluations")
    assert len((run_dir / "eep_E4" / "evaluations.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "is not an eep-compare run folder (no compare_config.yaml); give the folder"),
    (lambda d: (d.mkdir(), (d / "eep_config.yaml").write_text("seed: 0\n")),
     "it is an eep-search run: resume it with eep-search resume="),
])
def test_a_bad_resume_folder_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    from eep.cli.compare import redirect_resume

    folder = tmp_path / "r"
    make(folder)
    with pytest.raises(SystemExit) as stop:
        redirect_resume(["task=skills_add", f"resume={folder}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"eep-compare: error: resume={folder} ") and message in err
    with pytest.raises(UserError, match=f"resume={folder} "):
        compare.run(config([*SMALL, f"resume={folder}"]), tmp_path / "c")


def test_a_resume_folder_becomes_the_hydra_run_folder(tmp_path):
    from eep.cli.compare import redirect_resume

    (tmp_path / "compare_config.yaml").write_text("seed: 0\n")
    assert redirect_resume(["resume=" + str(tmp_path)])[-1] == f"hydra.run.dir={tmp_path.resolve()}"
    assert redirect_resume(["resume=null", "seed=1"]) == ["resume=null", "seed=1"]


def test_a_resume_applies_other_arguments_to_the_saved_config(tmp_path):
    from omegaconf import OmegaConf

    OmegaConf.save(config([*SMALL, "compare.methods=[reap]"]), tmp_path / "compare_config.yaml")
    resume = f"resume={tmp_path}"
    merged = compare.resumed_config(config([resume, "evaluator.test_limit=10"]), [resume, "evaluator.test_limit=10"])
    assert (merged.compare.methods, merged.evaluator.test_limit, merged.task.names) == (["reap"], 10,
                                                                                       ["skills_count_mc"])
    assert merged.resume == str(tmp_path) and not merged.resume_force
    fresh = compare.resumed_config(config([resume, "task=skills_add"]), [resume, "task=skills_add"])
    assert fresh.task.names == ["skills_add"] and fresh.compare.methods is None  # a group selection: composed anew


def test_cli_run_writes_its_folder_under_runs_compare(tmp_path):
    out = subprocess.run([sys.executable, "-m", "eep.cli.compare", *SMALL, "compare.methods=[frequency]",
                          "compare.export=true"], env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    tables = list((tmp_path / "runs" / "compare").glob("*/*/compare.csv"))
    assert len(tables) == 1 and "| frequency | 4 |" in out.stdout
    exported = json.loads((tables[0].parent / "models" / "frequency_E4" / "config.json").read_text())
    assert exported["num_local_experts"] == 4
