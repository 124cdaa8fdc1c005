"""Behaviour kept across refactors: a seeded search evaluates the genomes of a run recorded before them, in order.

The recording (``tests/data/recorded_search.json``) was written by ``python tests/test_recorded_search.py --record``
at the commit it names, before the application layer moved (issue 13). Genome hashes are compared exactly (they are
integers and subsets: hardware-independent as long as the fitness ranking is); fitness values within 0.02, one
document in 50 (accuracy on ``evaluator.limit=50`` documents moves in steps of 0.02 if a float rounding flips one).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

RECORDING = Path(__file__).parent / "data" / "recorded_search.json"
OVERRIDES = ["model=skills_mixtral", "task=skills_count_mc", "search.num_experts=4", "search.prune_budget=10",
             "search.merge_budget=4", "search.eep.population=4", "evaluator.limit=50",
             "evaluator.validation_limit=20", "evaluator.test_limit=20", "search.final_candidates=1", "seed=3"]


def run_rows(folder: Path) -> list[dict]:
    from eep import run_search

    run_search(compose_config("eep_search", OVERRIDES), folder)
    rows = [json.loads(line) for line in (folder / "evaluations.jsonl").read_text().splitlines()]
    return [{"genome_hash": r["genome_hash"], "phase": r["phase"], "fitness": r["fitness"]} for r in rows]


def test_a_seeded_search_evaluates_the_recorded_genomes_in_order(tmp_path):
    recorded = json.loads(RECORDING.read_text())
    assert recorded["overrides"] == OVERRIDES
    rows = run_rows(tmp_path / "run")
    assert [(r["genome_hash"], r["phase"]) for r in rows] == [(r["genome_hash"], r["phase"])
                                                              for r in recorded["rows"]]
    assert [r["fitness"] for r in rows] == pytest.approx([r["fitness"] for r in recorded["rows"]], abs=0.02)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = run_rows(Path(tmp) / "run")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    RECORDING.write_text(json.dumps({"command": "python tests/test_recorded_search.py --record", "commit": commit,
                                     "overrides": OVERRIDES, "rows": rows}, indent=1) + "\n")
    print(f"recorded {len(rows)} rows at {commit}")
