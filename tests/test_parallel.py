"""Parallel evaluation on Ray: 2 local CPU workers give the serial run's genomes and best; a worker killed mid-candidate
is replaced and its genome re-queued; a parallel run killed mid-batch resumes exactly. One local Ray instance serves
the whole module (its start-up takes seconds). And the Hydra launcher configs compose.

Ray and the launchers are the extras ``eep[ray,launchers]``: missing, these tests are skipped with a reason, except
where ``EEP_REQUIRE_EXTRAS=1`` (CI sets it), where a missing extra is an error."""
import importlib
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

from eep.parallel import RayPool


def optional(module: str):
    """``module`` imported, or None (tests needing it skip) unless EEP_REQUIRE_EXTRAS is set (CI)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("EEP_REQUIRE_EXTRAS"):
            raise
        return None


ray = optional("ray")
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'eep[ray]')")
if ray is not None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for every Ray test of the module."""
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


def _first(flag: str) -> bool:
    """True for the one process that creates ``flag`` (atomically: both workers may reach it at once)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def cheap_worker(flag: str, victim: int):
    """A worker's scorer: the synthetic fitness, a little slow; while ``flag`` does not exist, the ``victim``-th
    genome it scores kills its own process (SIGKILL) mid-candidate, once."""
    scored = []

    def score(genome):
        scored.append(genome)
        if len(scored) == victim and _first(flag):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
        return fitness(genome)

    return score


@needs_ray
def test_a_worker_killed_mid_candidate_is_replaced_and_the_run_equals_the_serial_one(local_ray, tmp_path, caplog):
    serial = run_plan(new_state(), fitness)
    flag = str(tmp_path / "killed")
    with caplog.at_level(logging.WARNING, logger="eep.parallel"), \
            RayPool(lambda: cheap_worker(flag, victim=3), workers=2, threads=1) as pool:
        parallel = run_plan(new_state(), pool)
        assert os.path.exists(flag) and len(pool.events) == 1
    assert parallel.finished and list(parallel.archive.entries) == list(serial.archive.entries)
    assert parallel.archive.best()[1] == serial.archive.best()[1]
    assert "died while evaluating genome" in caplog.text and "re-queueing" in caplog.text


@needs_ray
def always_dies_on(kept: list[int]):
    """A worker's scorer that kills its process whenever it scores a genome keeping ``kept`` in layer 0."""

    def score(genome):
        if genome.kept(0) == kept:
            os.kill(os.getpid(), signal.SIGKILL)
        return fitness(genome)

    return score


@needs_ray
def test_a_genome_that_keeps_killing_workers_stops_the_search_with_worker_lost(local_ray):
    from eep.parallel import WorkerLost

    killer, done = Genome.pruning([[4, 5, 6, 7]] * 2, 8, 2), []
    with RayPool(lambda: always_dies_on([4, 5, 6, 7]), workers=2, threads=1, max_retries=2) as pool:
        with pytest.raises(WorkerLost, match="killed 2 Ray workers in a row"):
            pool.run([killer], lambda g, r: done.append(r))
        assert [e["genome_hash"] for e in pool.events] == [killer.content_hash()] * 2 and done == []


@needs_ray
def test_a_parallel_run_killed_mid_batch_resumes_to_the_uninterrupted_result(local_ray, tmp_path):
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


@needs_ray
def test_eep_search_with_two_workers_evaluates_the_serial_runs_genomes(local_ray, tmp_path):
    """``evaluator.workers=2 evaluator.threads=1`` = ``search.ask_batch=2 evaluator.threads=1``: the same rows (in ask
    order, same fitness and metrics), best genome and fitness; report.json records the workers."""
    from conftest import compose_config

    from eep.search import app

    tiny = ["model=skills_olmoe", "task=skills_count", "search.num_experts=8", "search.prune_budget=4",
            "search.merge_budget=2", "search.eep.population=3", "evaluator.limit=20", "evaluator.validation_limit=10",
            "evaluator.test_limit=10", "search.final_candidates=1", "evaluator.threads=1"]
    reports = {name: app.run(compose_config("eep_search", [*tiny, extra]), tmp_path / name)
               for name, extra in (("serial", "search.ask_batch=2"), ("parallel", "evaluator.workers=2"))}
    rows = {name: [(r["genome_hash"], r["fitness"], r["metrics"]) for r in map(
        json.loads, (tmp_path / name / "evaluations.jsonl").read_text().splitlines())] for name in reports}
    assert len(rows["serial"]) == 6 and rows["parallel"] == rows["serial"]
    best = {name: json.loads((tmp_path / name / "best.json").read_text()) for name in reports}
    assert best["parallel"] == best["serial"]
    assert reports["parallel"]["workers"] == 2 and reports["serial"]["workers"] == 1
    assert reports["parallel"]["worker_restarts"] == []


@pytest.mark.parametrize("launcher, plugin, target", [
    ("joblib_cpu", "hydra_plugins.hydra_joblib_launcher", "joblib_launcher.JoblibLauncher"),
    ("slurm_gpu", "hydra_plugins.hydra_submitit_launcher", "submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_compose_with_sweeps_under_runs(launcher, plugin, target):
    """``hydra/launcher=joblib_cpu`` and ``=slurm_gpu`` compose and build their launcher (no SLURM needed to build
    it); sweep folders go under runs/multirun/."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import eep

    if optional(plugin) is None:
        pytest.skip(f"{plugin} is not installed (pip install 'eep[launchers]')")
    with initialize_config_dir(version_base="1.3", config_dir=str(eep.conf_dir())):  # with the hydra node
        cfg = compose(config_name="eep_search", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"{plugin}.{target}"
    assert cfg.hydra.sweep.dir.startswith("runs/multirun/")
    assert type(instantiate(cfg.hydra.launcher)).__name__ == target.split(".")[-1]
    if launcher == "slurm_gpu":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.submitit_folder.startswith("runs/")
