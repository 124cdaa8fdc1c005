"""Parallel evaluation on Ray: 2 local CPU workers give the serial run's genomes and best; a worker killed mid-candidate
is replaced and its genome re-queued; a parallel run killed mid-batch resumes exactly. One local Ray instance serves
the whole module (its start-up takes seconds)."""
import json
import logging
import os
import signal
import sys
import time

import pytest

from eep.genome import Genome
from eep.search.state import Phase, SearchState, load_checkpoint, run_plan, save_checkpoint
from eep.search.strategy import EEPSettings

try:
    import ray
except ImportError:  # CI installs eep[ray] and sets EEP_REQUIRE_RAY=1, so there this is an error, not a skip
    if os.environ.get("EEP_REQUIRE_RAY"):
        raise
    pytest.skip("Ray is not installed (pip install 'eep[ray]')", allow_module_level=True)

from eep.parallel import RayPool  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def fitness(genome: Genome) -> float:
    kept = [set(genome.kept(i) or []) for i in range(genome.num_layers)]
    return sum(len({0, 1, 2, 3} & k) for k in kept) / 8 - float(genome.merge.abs().mean()) / 10


def new_state(ask_batch: int = 2) -> SearchState:
    return SearchState(plan=(Phase("prune", "eep", 12), Phase("merge", "eep", 6)),
                       template=Genome.pruning([[0, 1, 2, 3]] * 2, 8, 2), seed=3, settings=EEPSettings(population=5),
                       ask_batch=ask_batch)


def cheap_worker(flag: str, victim: int):
    """A worker's scorer: the synthetic fitness, a little slow; while ``flag`` does not exist, the ``victim``-th
    genome it scores kills its own process (SIGKILL) mid-candidate, once."""
    scored = []

    def score(genome):
        scored.append(genome)
        if len(scored) == victim and not os.path.exists(flag):
            open(flag, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
        return fitness(genome)

    return score


def test_a_worker_killed_mid_candidate_is_replaced_and_the_run_equals_the_serial_one(tmp_path, caplog):
    serial = run_plan(new_state(), fitness)
    flag = str(tmp_path / "killed")
    with caplog.at_level(logging.WARNING, logger="eep.parallel"), \
            RayPool(lambda: cheap_worker(flag, victim=3), workers=2, threads=1) as pool:
        parallel = run_plan(new_state(), pool)
        assert os.path.exists(flag) and len(pool.events) == 1
    assert parallel.finished and list(parallel.archive.entries) == list(serial.archive.entries)
    assert parallel.archive.best()[1] == serial.archive.best()[1]
    assert "died while evaluating genome" in caplog.text and "re-queueing" in caplog.text


def test_a_parallel_run_killed_mid_batch_resumes_to_the_uninterrupted_result(tmp_path):
    full = run_plan(new_state(), fitness)
    path, saves = tmp_path / "state.pkl", [0]

    class Killed(Exception):
        pass

    def dying_checkpoint(state):
        save_checkpoint(state, path)
        saves[0] += 1
        if saves[0] == 20:  # the driver dies part-way through the search
            raise Killed

    with RayPool(lambda: cheap_worker(str(tmp_path / "no-kill"), victim=0), workers=2, threads=1) as pool:
        with pytest.raises(Killed):
            run_plan(new_state(), pool, checkpoint=dying_checkpoint)
        state = load_checkpoint(path)
        assert not state.finished and 0 < len(state.archive.entries) < 18
        resumed = run_plan(state, pool, checkpoint=lambda s: save_checkpoint(s, path))
    assert list(resumed.archive.entries) == list(full.archive.entries)
    assert resumed.archive.best()[1] == full.archive.best()[1] and load_checkpoint(path).finished


def test_eep_search_with_two_workers_evaluates_the_serial_runs_genomes(tmp_path):
    """``evaluator.workers=2 evaluator.threads=1`` = ``search.ask_batch=2 evaluator.threads=1``: the same rows (in ask
    order, same fitness and metrics), best genome and fitness; report.json records the workers."""
    from test_search_app import config

    from eep.search import app

    tiny = ["model=skills_olmoe", "task=skills_count", "search.num_experts=8", "search.prune_budget=4",
            "search.merge_budget=2", "search.eep.population=3", "evaluator.limit=20", "evaluator.validation_limit=10",
            "evaluator.test_limit=10", "search.final_candidates=1", "evaluator.threads=1"]
    reports = {name: app.run(config([*tiny, extra]), tmp_path / name)
               for name, extra in (("serial", "search.ask_batch=2"), ("parallel", "evaluator.workers=2"))}
    rows = {name: [(r["genome_hash"], r["fitness"], r["metrics"]) for r in map(
        json.loads, (tmp_path / name / "evaluations.jsonl").read_text().splitlines())] for name in reports}
    assert len(rows["serial"]) == 6 and rows["parallel"] == rows["serial"]
    best = {name: json.loads((tmp_path / name / "best.json").read_text()) for name in reports}
    assert best["parallel"] == best["serial"]
    assert reports["parallel"]["workers"] == 2 and reports["serial"]["workers"] == 1
    assert reports["parallel"]["worker_restarts"] == []
