"""The main job's output: eep's progress bar, warnings and results, none of the third-party lines eep knows to be
harmless; ``verbose=true`` shows them again.

The real ``eep-search`` CLI runs twice in subprocesses (quiet and ``verbose=true``, at the same time), through a small
script that makes one search candidate's evaluation raise, so that eep's own warning for a failed candidate must be
in the quiet output. Each run has a fresh matplotlib config folder, so matplotlib builds its font cache (and logs
about it) in both.
"""
import os
import re
import subprocess
import sys

import pytest

# One search candidate's evaluation raises (inside the third call of the search-split fitness: match+likelihood's
# teacher-forced pass, the main job's fitness), then the CLI runs.
SCRIPT = r"""
import sys
from eep.cli import search
from eep.evaluate.dense import DenseFitness

real_evaluate, real_probs, calls = DenseFitness.evaluate, DenseFitness._probs, {"n": 0, "fail": False}

def evaluate(self):
    calls["n"] += self.role == "search"
    calls["fail"] = self.role == "search" and calls["n"] == 3
    return real_evaluate(self)

def probs(self, batch):
    if calls["fail"]:
        raise RuntimeError("injected failure for the output test")
    return real_probs(self, batch)

DenseFitness.evaluate, DenseFitness._probs = evaluate, probs
sys.argv = ["eep-search", *sys.argv[1:]]
search.main()
"""
# the main job's model and task (the defaults), tiny budgets; both phases run
SMALL = ["search.prune_budget=4", "search.merge_budget=1", "search.eep.population=3", "evaluator.limit=10",
         "evaluator.validation_limit=10", "evaluator.test_limit=10", "search.final_candidates=1"]
# the known-harmless third-party lines (lm-eval, transformers, matplotlib) that the main job printed before
KNOWN = ("Custom kwargs can be passed to `--metadata`", "`pretrained` model kwarg is not of type `str`",
         "Passed an already-initialized model through `pretrained`", "seem to have been set",
         "generation flags are not valid", "Matplotlib is building the font cache", "generated new fontManager",
         "findfont:", "Building contexts for", "Loading weights", "Writing model shards")
# a line of those libraries' loggers: Hydra's format `[time][lm_eval.api.task][WARNING] - ...` or transformers' own
# `[transformers] ...`
THIRD_PARTY = re.compile(r"\[(lm_eval|transformers|matplotlib)(\.[\w.]+)?\]")
FAILED = "injected failure for the output test"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """stdout + stderr of the quiet run and of the ``verbose=true`` run (both exit 0)."""
    root = tmp_path_factory.mktemp("output")
    procs = {}
    for name, extra in (("quiet", []), ("verbose", ["verbose=true"])):
        env = {k: v for k, v in os.environ.items()
               if k not in ("EEP_VERBOSE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "MPLBACKEND")}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                   MPLCONFIGDIR=str(root / f"mpl_{name}"))
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *SMALL, *extra, f"hydra.run.dir={root / name}"], cwd=root, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{out[name][-3000:]}"
    return out


def _lines(text: str) -> list[str]:
    return [line for chunk in text.splitlines() for line in chunk.split("\r")]


def test_the_main_job_prints_no_third_party_lines(outputs):
    lines = _lines(outputs["quiet"])
    assert [line for line in lines if any(k in line for k in KNOWN)] == []
    assert [line for line in lines if THIRD_PARTY.search(line)] == []


def test_the_main_job_keeps_eeps_progress_bar_warnings_and_results(outputs):
    text = outputs["quiet"]
    assert "eep-search:" in text and "phase=merge" in text                  # eep's own progress bar
    assert re.search(r"^eep \(exported\)\s+\d\.\d{4}\s+4\s", text, re.M)    # the results table
    failed = [line for line in _lines(text) if FAILED in line]
    assert failed and all(re.search(r"\]\[eep\.[\w.]+\]\[WARNING\]", line) for line in failed), failed
    assert "validation of candidate" in text                               # eep's INFO lines stay


def test_verbose_shows_the_third_party_lines_again(outputs):
    text = outputs["verbose"]
    for known in ("Custom kwargs can be passed to `--metadata`", "`pretrained` model kwarg is not of type `str`",
                  "Passed an already-initialized model through `pretrained`", "generated new fontManager",
                  "Loading weights"):
        assert known in text, known
    assert FAILED in text and re.search(r"^eep \(exported\)", text, re.M)
