"""eep-compare: methods and counts checked before the model loads, and a small real comparison's outputs."""
import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import compose_config

from eep import compare
from eep.search.run import UserError

SMALL = ["model=skills_mixtral", "task=skills_count_mc", "evaluator.limit=20", "evaluator.validation_limit=20",
         "evaluator.test_limit=40", "search.prune_budget=4", "search.merge_budget=0", "search.eep.population=3",
         "search.final_candidates=1", "compare.calibration_docs=16", "compare.random_seeds=2"]


def config(overrides):
    return compose_config("eep_compare", overrides)


@pytest.mark.parametrize("override, message", [
    ("compare.methods=[frequency,magic]", "compare.methods: unknown method 'magic'; valid: eep, enumeration"),
    ("compare.num_experts=[4,9]", "search.num_experts=9: must be an integer between 1 and the model's 8 experts"),
    ("compare.calibration=wiki", "compare.calibration=wiki: use task"),
])
def test_bad_compare_settings_are_refused_before_the_model_loads(tmp_path, override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        compare.run(config([*SMALL, override]), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_every_method_is_compared_by_default():
    from eep.methods import METHODS

    assert compare.methods_of(config(SMALL)) == list(compare.ALL_METHODS)
    assert set(compare.ALL_METHODS) == {*METHODS, "eep"}


def test_a_small_comparison_writes_table_csv_and_plot(tmp_path):
    run_dir = tmp_path / "c"
    rows = compare.run(config([*SMALL, "compare.methods=[random,frequency,eep]", "compare.num_experts=[4,6]"]),
                       run_dir)
    assert [(r.method, r.num_experts) for r in rows] == [
        ("full", 8), ("random", 4), ("frequency", 4), ("eep", 4), ("random", 6), ("frequency", 6), ("eep", 6)]
    with (run_dir / "compare.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(t["method"], int(t["num_experts"])) for t in table] == [(r.method, r.num_experts) for r in rows]
    assert all(0.0 <= float(t["test_score"]) <= 1.0 for t in table)
    randoms = [r for r in rows if r.method == "random"]
    assert all(r.runs == 2 and len(r.scores) == 2 and r.test_std is not None for r in randoms)
    eep_report = run_dir / "eep_E4" / "report.json"
    assert eep_report.exists() and (run_dir / "eep_E6" / "report.json").exists()
    assert (run_dir / "compare.png").stat().st_size > 0 and "| frequency | 4 |" in (run_dir / "compare.md").read_text()


def test_cli_run_writes_its_folder_under_runs_compare(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "eep.cli.compare", *SMALL, "compare.methods=[frequency]",
                          "compare.export=true"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    tables = list((tmp_path / "runs" / "compare").glob("*/*/compare.csv"))
    assert len(tables) == 1 and "| frequency | 4 |" in out.stdout
    exported = json.loads((tables[0].parent / "models" / "frequency_E4" / "config.json").read_text())
    assert exported["num_local_experts"] == 4
